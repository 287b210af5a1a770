"""
Build each target's NixOS system on its builder and push-deploy it: nixpush's main job.

    pyinfra inventory.py deploys/pi.py                       # every host with a builder_host
    pyinfra inventory.py deploys/pi.py --limit pi4           # one
    pyinfra inventory.py deploys/pi.py --data deploy_action=test   # or boot, dry-activate, build

Per target (operations/push/, one module a step): make sure it accepts the builder's pushes
(deploy key authorized, signing key trusted: the same operations as deploys/secrets.py, so the
age key must be available); plan (desired toplevel evaluated on the builder vs.
/run/current-system); build on the builder once per configuration; sign and copy the closure
builder -> target over ssh-ng; dry-activate and show its report; then set the profile,
switch-to-configuration, and verify.
"""

from pyinfra.context import host, state

from operations import keys, nix, ssh
from operations.failures import DeployFailed, report_unable
from operations.models import Builder, Plan
from operations.push import activate, build, copy, plan
from operations.start import start_deploy

deploy = start_deploy(state)
spec = deploy.specs[host.name]
deploy.summary.forgive(
    plan.needed_hosts(deploy.specs, {h.name for h in state.inventory if state.is_host_in_limit(h)})
)


def _plan() -> tuple[Plan, Builder] | None:
    """The target's plan, or None when planning failed (the target then fails alone)."""
    try:
        builder = plan.reach_builder(host, spec)
        plan.check_builder(builder, spec)
        return plan.plan_deploy(host, spec, builder, deploy.summary), builder
    except DeployFailed as failure:
        report_unable(str(failure))
    except Exception as error:
        report_unable(f"planning {host.name} failed: {type(error).__name__}: {error}")
    return None


if spec.builder_host is None or spec.ssh_hostname is None:  # check_fleet: targets have both
    deploy.summary.skip(host.name, "not deployed by push (no builder_host)")
else:
    # Decrypt first: a missing or wrong age key stops the run before anything is evaluated.
    trust = keys.builder_trust(state.inventory.get_host(spec.builder_host), host.name)
    planned = _plan()
    if planned is not None:
        target_plan, builder = planned
        # What lets the builder push, checked only when it will push: `build` leaves the
        # target alone, and a target already on its system needs nothing.
        if target_plan.action.copies and not target_plan.up_to_date:
            ssh.authorized_key(
                name="Authorize the builder's deploy key",
                user=spec.ssh_user or "root",
                key=trust.ssh_public_key,
            )
            nix.trusted_public_key(
                name="Trust paths signed by the builder", key=trust.nix_public_key
            )
        build.build_toplevel(
            name="Build the system on its builder", plan=target_plan, builder=builder
        )
        copy.sign_closure(name="Sign the closure on the builder", plan=target_plan, builder=builder)
        copy.copy_closure(
            name="Copy the closure from the builder",
            plan=target_plan,
            builder=builder,
            address=spec.ssh_hostname,
            port=spec.ssh_port,
            user=spec.ssh_user or "root",
        )
        sudo = bool(host.data.get("_sudo", False))
        activate.dry_activate(name="Dry-activate", plan=target_plan, sudo=sudo)
        activate.activate(name="Activate", plan=target_plan, sudo=sudo)
