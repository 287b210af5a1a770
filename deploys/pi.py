"""
Build each target's NixOS system on its builder and push-deploy it: nixpush's main job.

    pyinfra inventory.py deploys/pi.py                       # every host with a builder_host
    pyinfra inventory.py deploys/pi.py --limit pi4           # one
    pyinfra inventory.py deploys/pi.py --data deploy_action=test   # or boot, dry-activate, build

Per target: plan (desired toplevel evaluated on the builder vs. /run/current-system), build on
the builder once per configuration, copy the signed closure builder -> target over ssh-ng,
dry-activate and show its report, then set the profile and switch-to-configuration, and verify.
"""

from pyinfra import host, state

from operations import nixos, push
from operations.fleet import check_fleet
from operations.nixos import DeployFailed
from operations.summary import summary_for

specs = check_fleet(state.inventory)
spec = specs[host.name]
summary = summary_for(state)
summary.forgive(
    push.needed_hosts(specs, {h.name for h in state.inventory if state.is_host_in_limit(h)})
)

if not spec.is_target:
    summary.skip(host.name, "not deployed by push (no builder_host)")
else:
    try:
        builder = push.reach_builder(host, spec)
        push.check_builder(builder, spec)
        host_key = push.target_host_key(host, spec)
        plan = push.plan_deploy(host, spec, builder)
    except DeployFailed as failure:
        push.report_unable(str(failure))
    else:
        nixos.build_toplevel(name="Build the system on its builder", plan=plan, builder=builder)
        nixos.copy_closure(
            name="Copy the closure from the builder",
            plan=plan,
            builder=builder,
            address=spec.ssh_hostname,
            port=spec.ssh_port,
            user=spec.ssh_user or "root",
            host_key=host_key,
        )
        sudo = bool(host.data.get("_sudo", False))
        nixos.dry_activate(name="Dry-activate", plan=plan, sudo=sudo)
        nixos.activate(name="Activate", plan=plan, sudo=sudo)
