"""
Build each target's NixOS system on its builder and push-deploy it: nixpush's main job.

    pyinfra inventory.py deploys/pi.py                       # every host with a builder_host
    pyinfra inventory.py deploys/pi.py --limit pi4           # one
    pyinfra inventory.py deploys/pi.py --data deploy_action=test   # or boot, dry-activate, build

Per target: make sure it accepts the builder's pushes (deploy key authorized, signing key
trusted: the same operations as deploys/secrets.py, so the age key must be available), plan
(desired toplevel evaluated on the builder vs. /run/current-system), build on the builder once
per configuration, copy the signed closure builder -> target over ssh-ng, dry-activate and show
its report, then set the profile and switch-to-configuration, and verify.
"""

from pyinfra import host, state

from operations import activation, health, nix, nixos, push, ssh
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
    # Decrypt first: a missing or wrong age key stops the run before anything is evaluated.
    trust = ssh.builder_trust(state.inventory.get_host(spec.builder_host), host.name)
    try:
        if spec.deploy_action == "rollback":  # safe switching: back to the previous generation
            plan = activation.plan_rollback(host, spec)
        else:
            builder = push.reach_builder(host, spec)
            push.check_builder(builder, spec)
            plan = push.plan_deploy(host, spec, builder)
    except DeployFailed as failure:
        push.report_unable(str(failure))
    else:
        # safe switching: rollback, timers and health checks from data (bad data stops the run)
        safety = activation.safety_for(host, plan.action)
        checks = health.host_health_checks(host)
        activation.announce(host, plan, safety, checks)
        # What lets the builder push, checked only when it will push: `build` leaves the
        # target alone, and a target already on its system needs nothing.
        if plan.copies and not plan.up_to_date and plan.action != "rollback":
            ssh.authorized_key(
                name="Authorize the builder's deploy key",
                user=spec.ssh_user or "root",
                key=trust.ssh_public_key,
            )
            nix.trusted_public_key(
                name="Trust paths signed by the builder", key=trust.nix_public_key
            )
        if plan.action != "rollback":  # a rollback's system is already on the target
            nixos.build_toplevel(name="Build the system on its builder", plan=plan, builder=builder)
            nixos.copy_closure(
                name="Copy the closure from the builder",
                plan=plan,
                builder=builder,
                address=spec.ssh_hostname,
                port=spec.ssh_port,
                user=spec.ssh_user or "root",
            )
        sudo = bool(host.data.get("_sudo", False))
        nixos.dry_activate(name="Dry-activate", plan=plan, sudo=sudo)
        activation.activate_safely(
            name="Activate (detached, confirmed, rolled back on failure)",
            plan=plan,
            safety=safety,
            checks=checks,
            sudo=sudo,
        )
