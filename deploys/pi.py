"""
Build each target's NixOS system on its builder and push-deploy it: nixpush's main job.

    pyinfra inventory.py deploys/pi.py                       # every host with a builder_host
    pyinfra inventory.py deploys/pi.py --limit pi4           # one
    pyinfra inventory.py deploys/pi.py --data deploy_action=test   # boot, dry-activate, build,
                                                                   # rollback

Per target (operations/push/, one module a step): make sure it accepts the builder's pushes
(deploy key authorized, signing key trusted: the same operations as deploys/secrets.py, so the
age key must be available); plan (desired toplevel evaluated on the builder vs.
/run/current-system); build on the builder once per configuration; sign and copy the closure
builder -> target over ssh-ng; dry-activate and show its report, then (in the same round
trip, only if that passed) activate safely: detached from the SSH session, health-checked,
confirmed over a new SSH login, rolled back by the target itself otherwise. With more than
one ``deploy_wave`` in the run, a wave activates only once the earlier ones deployed and stayed
healthy for their ``wave_soak`` (``operations.push.waves``); builds and copies do not wait.

A host whose ``builder_host`` is itself (the NAS) evaluates and builds on itself, needs no
trust and copies nothing, then activates with the same safety. Image hosts (``@image/NAME``)
are deploys/image.py's.
"""

from functools import partial

from pyinfra import logger
from pyinfra.context import host, state

from operations.builder import nix
from operations.core.failures import Unable, attempt, or_unable
from operations.core.models import Builder, Plan
from operations.push import activate, build, copy, plan, prune, reboot, waves
from operations.push.start import start_deploy
from operations.trust import keys, ssh

deploy = start_deploy(state)
spec = deploy.specs[host.name]
cache = deploy.cache
in_run = {h.name for h in state.inventory if state.is_host_in_limit(h)}
deploy.summary.forgive(plan.needed_hosts(deploy.specs, in_run))
# The activation waves of this run's targets (deploy_wave); hosts outside --limit have none.
run_waves = {s.deploy_wave for s in deploy.specs.values() if s.is_target and s.name in in_run}


def _plan() -> tuple[Plan, Builder | None]:
    """The target's plan and builder (none for a rollback); raises when planning fails (the
    target then fails alone: ``or_unable``)."""
    if not spec.deploy_action.builds:  # a rollback: back to the previous generation
        return plan.plan_rollback(host, spec, deploy.summary), None
    builder = plan.reach_builder(host, spec, cache)
    plan.check_builder(builder, spec, cache)
    return plan.plan_deploy(host, spec, builder, deploy.summary, cache), builder


# Targets that are only built need no connection: those that are off or away are built from
# their builder's run (when the builder is in it: `--limit nas --limit pi4`).
for unreachable in plan.unreachable_builds(host, deploy.specs):
    # The real Host, not pyinfra's context proxy: steps may run it from greenlets of their own.
    itself = plan.builder_of(state.inventory.get_host(host.name), spec)
    unreachable_plan = attempt(
        f"planning {unreachable.name}",
        partial(
            plan.plan_deploy,
            state.inventory.get_host(unreachable.name), unreachable, itself, deploy.summary, cache,
        ),
    )  # fmt: skip
    if isinstance(unreachable_plan, Unable):
        deploy.summary.fail(unreachable.name, unreachable_plan.cause)
    else:
        build.build_toplevel(
            name=f"Build {unreachable.name}'s system (not connected: build only)",
            plan=unreachable_plan,
            builder=itself,
            cache=cache,
        )

if spec.is_image:
    deploy.summary.skip(host.name, "an image: deploys/image.py builds it")
elif not spec.is_target or spec.ssh_hostname is None:  # check_fleet: targets have both
    deploy.summary.skip(host.name, "not deployed by push (no builder_host)")
else:
    # Decrypt first: a missing or wrong age key stops the run before anything is evaluated.
    # A host that builds itself is pushed nothing, so it needs no trust in a builder.
    trust: keys.BuilderTrust | None = None
    if spec.pushed_by is not None:
        trust = keys.builder_trust(state.inventory.get_host(spec.pushed_by), host.name)
    planned = or_unable(f"planning {host.name}", _plan)
    if planned is not None:
        target_plan, builder = planned
        # Rollback, timers and health checks from data (checked at the start); checks that may
        # outlast the confirmation window stop the run here (whether unit checks run needs the
        # host's systemd); --dry shows whether rollback is armed and which checks will run.
        safety = spec.safety(target_plan.action)
        checks = spec.health_checks
        activate.check_window(host, safety, checks if target_plan.action.activates else ())
        activate.announce(host, target_plan, safety, checks)
        if target_plan.action.activates and not target_plan.up_to_date:
            wave_line = waves.describe_wave(run_waves, spec.deploy_wave, spec.wave_soak)
            if wave_line:
                host.log_styled(wave_line, log_func=logger.info)
    # A target already on its system (planning logged it) gets no operations: each would be a
    # no-op, and pyinfra's bookkeeping of an operation call costs the controller CPU per host,
    # which is most of what a no-change run of a fleet does.
    if planned is not None and not target_plan.up_to_date:
        # What lets the builder push, checked only when it will push: `build` leaves the
        # target alone, and a target already on its system needs nothing.
        if trust is not None and target_plan.action.copies:
            ssh.authorized_key(
                name="Authorize the builder's deploy key",
                user=spec.ssh_user or "root",
                key=trust.ssh_public_key,
            )
            nix.trusted_public_key(
                name="Trust paths signed by the builder", key=trust.nix_public_key
            )
        if builder is not None:  # a rollback's system is on the target already
            build.build_toplevel(
                name="Build the system on its builder",
                plan=target_plan,
                builder=builder,
                cache=cache,
            )
        if builder is not None and trust is not None:  # built on itself: nothing to copy
            copy.sign_closure(
                name="Sign the closure on the builder",
                plan=target_plan,
                builder=builder,
                cache=cache,
            )
            copy.copy_closure(
                name="Copy the closure from the builder",
                plan=target_plan,
                builder=builder,
                cache=cache,
                address=spec.ssh_hostname,
                port=spec.ssh_port,
                user=spec.ssh_user or "root",
            )
        if builder is not None and target_plan.booted and target_plan.new_boot is None:
            # Not built when planning: whether it needs a reboot is read once it is.
            reboot.note_reboot_needed(
                name="Whether the new system needs a reboot",
                plan=target_plan,
                builder=builder,
                summary=deploy.summary,
            )
        sudo = spec.sudo
        if not target_plan.action.activates:  # an activation dry-activates first itself
            activate.dry_activate(name="Dry-activate", plan=target_plan, sudo=sudo)
        if target_plan.action.activates:
            # Its wave waits for the earlier ones at execute time; builds and copies do not.
            worst = activate.worst_case(safety, checks, spec.wave_soak)
            cache.waves.join(host.name, spec.deploy_wave, worst)
        activate.activate_safely(
            name="Activate (detached, confirmed, rolled back on failure)",
            plan=target_plan,
            safety=safety,
            checks=checks,
            sudo=sudo,
            waves=cache.waves,
            soak=spec.wave_soak,
        )
        # Runs only when the activation was confirmed (a failed host runs no later step).
        if spec.keep_generations is not None or spec.gc_after_deploy:
            keep, gc = spec.keep_generations or prune.KEEP_ALL, spec.gc_after_deploy
            prune.announce(host, target_plan, keep, gc, sudo)  # --dry: what would go
            prune.prune_generations(
                name="Prune old system generations", plan=target_plan, keep=keep, gc=gc, sudo=sudo
            )
