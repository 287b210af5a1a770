"""
nixpush's main job for one host, at prepare time: what ``deploys/pi.py`` runs.

Per target (one module a step, in this folder): make sure it accepts the builder's pushes
(deploy key authorized, signing key trusted: the same operations as deploys/secrets.py, so the
age key must be available); plan (desired toplevel evaluated on the builder vs.
/run/current-system); build on the builder once per configuration; sign and copy the closure
builder -> target over ssh-ng; dry-activate and show its report, then (in the same round
trip, only if that passed) activate safely: detached from the SSH session, health-checked,
confirmed over a new SSH login, rolled back by the target itself otherwise. With more than
one ``deploy_wave`` in the run, a wave activates only once the earlier ones deployed and stayed
healthy for their ``wave_soak`` (``waves.py``); builds and copies do not wait. A confirmed
switch is followed by a reboot when the ``reboot`` data asks for it (``reboot.py``, in the
activation's step: a later wave waits for it). After a confirmed switch, old generations are
pruned (``keep_generations``, ``gc_after_deploy``).

A host whose ``builder_host`` is itself (the NAS) evaluates and builds on itself, needs no
trust and copies nothing, then activates with the same safety. A builder also plans and builds
its targets that are only built and could not be connected. Image hosts (``@image/NAME``) are
deploys/image.py's; hosts without a ``builder_host`` are skipped.

pyinfra orders operations by the call stack's line numbers, so the steps below are called in
the order they run, from one place each.

.. code:: python

    from pyinfra.context import host, state
    from operations.push.flow import deploy_target
    from operations.push.start import start_deploy

    deploy_target(state, host, start_deploy(state))
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from typing import TYPE_CHECKING

from pyinfra import logger

from operations.builder import nix
from operations.core.failures import Unable, attempt, or_unable
from operations.core.models import Action, Builder, Plan, Safety
from operations.push import activate, build, copy, plan, provenance, prune, reboot, waves
from operations.trust import keys, ssh

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

    from operations.core.summary import RunSummary
    from operations.data.fleet import HostSpec
    from operations.push.runcache import RunCache
    from operations.push.start import Deploy


def deploy_target(state: State, host: Host, deploy: Deploy) -> None:
    """
    Plan and add every operation of the push deploy for ``host`` (deploy code: it runs once
    per host, at prepare time).

    + state: the run's pyinfra state (its inventory and ``--limit``)
    + host: the current host
    + deploy: what ``start_deploy(state)`` answered

    **Example:** ``deploy_target(state, host, start_deploy(state))``
    """
    spec = deploy.specs[host.name]
    in_run = {h.name for h in state.inventory if state.is_host_in_limit(h)}
    deploy.summary.forgive(plan.needed_hosts(deploy.specs, in_run))
    build_unconnected(state, host, deploy)
    if spec.is_image:
        deploy.summary.skip(host.name, "an image: deploys/image.py builds it")
    elif not spec.is_target or spec.ssh_hostname is None:  # check_fleet: targets have both
        deploy.summary.skip(host.name, "not deployed by push (no builder_host)")
    else:
        push_target(state, host, deploy, in_run, spec.ssh_hostname)


def build_unconnected(state: State, host: Host, deploy: Deploy) -> None:
    """Targets that are only built need no connection: those of ``host`` (their builder) that
    are off or away are built from its run (when it is in it: ``--limit nas --limit pi4``)."""
    for unreachable in plan.unreachable_builds(host, deploy.specs):
        # The real Host, not pyinfra's context proxy: steps may run it from greenlets of their own.
        itself = plan.builder_of(state.inventory.get_host(host.name), deploy.specs[host.name])
        unreachable_plan = attempt(
            f"planning {unreachable.name}",
            partial(
                plan.plan_deploy,
                state.inventory.get_host(unreachable.name), unreachable, itself, deploy.summary,
                deploy.cache,
            ),
        )  # fmt: skip
        if isinstance(unreachable_plan, Unable):
            deploy.summary.fail(unreachable.name, unreachable_plan.cause)
        else:
            build.build_toplevel(
                name=f"Build {unreachable.name}'s system (not connected: build only)",
                plan=unreachable_plan,
                builder=itself,
                cache=deploy.cache,
            )


def push_target(
    state: State, host: Host, deploy: Deploy, in_run: Collection[str], address: str
) -> None:
    """The target's steps: trust, plan, announce, then (unless it is on its system already)
    the operations that push (to ``address``, its ``ssh_hostname``), activate and prune."""
    spec = deploy.specs[host.name]
    # Decrypt first: a missing or wrong age key stops the run before anything is evaluated.
    # A host that builds itself is pushed nothing, so it needs no trust in a builder.
    trust: keys.BuilderTrust | None = None
    if spec.pushed_by is not None:
        trust = keys.builder_trust(deploy.specs, spec.pushed_by, host.name)
    planned = or_unable(f"planning {host.name}", partial(plan_target, host, spec, deploy))
    if planned is None:
        return
    target_plan, builder = planned
    safety = spec.safety(target_plan.action)
    announce_target(host, spec, target_plan, safety, deploy, in_run)
    provenance.check_target(host, spec, target_plan, builder, deploy)
    if target_plan.up_to_date or not target_plan.action.activates:
        deploy.cache.waves.excuse(host.name)  # nothing to activate: it holds no wave up
    # A target already on its system (planning logged it) gets no operations: each would be a
    # no-op, and pyinfra's bookkeeping of an operation call costs the controller CPU per host,
    # which is most of what a no-change run of a fleet does.
    if target_plan.up_to_date:
        return
    let_builder_push(spec, target_plan, trust)
    build_and_copy(spec, address, target_plan, builder, trust, deploy.cache)
    note_reboot_needed(target_plan, builder, deploy.summary)
    activate_target(spec, target_plan, safety, deploy.cache)
    prune_target(host, spec, target_plan)
    provenance.record_target(spec, target_plan, builder, deploy)


def plan_target(host: Host, spec: HostSpec, deploy: Deploy) -> tuple[Plan, Builder | None]:
    """The target's plan and builder (none for a rollback); raises when planning fails (the
    target then fails alone: ``or_unable``)."""
    if not spec.deploy_action.builds:  # a rollback: back to the previous generation
        return plan.plan_rollback(host, spec, deploy.summary), None
    builder = plan.reach_builder(host, spec, deploy.cache)
    plan.check_builder(builder, spec, deploy.cache)
    return plan.plan_deploy(host, spec, builder, deploy.summary, deploy.cache), builder


def announce_target(
    host: Host,
    spec: HostSpec,
    target_plan: Plan,
    safety: Safety,
    deploy: Deploy,
    in_run: Collection[str],
) -> None:
    """Rollback, timers and health checks from data (checked at the start); checks that may
    outlast the confirmation window stop the run here (whether unit checks run needs the host's
    systemd); ``--dry`` shows whether rollback is armed, which checks will run, and the wave."""
    checks = spec.health_checks
    activate.check_window(host, safety, checks if target_plan.action.activates else ())
    activate.announce(host, target_plan, safety, checks)
    if target_plan.action is Action.SWITCH and not target_plan.up_to_date:
        reboot_line = reboot.describe_reboot(spec.reboot, target_plan.reboot_changes)
        if reboot_line:
            host.log_styled(reboot_line, log_func=logger.info)
    if target_plan.action.activates and not target_plan.up_to_date:
        # The activation waves of this run's targets; hosts outside --limit have none.
        run_waves = {
            s.deploy_wave for s in deploy.specs.values() if s.is_target and s.name in in_run
        }
        wave_line = waves.describe_wave(run_waves, spec.deploy_wave, spec.wave_soak)
        if wave_line:
            host.log_styled(wave_line, log_func=logger.info)


def let_builder_push(spec: HostSpec, target_plan: Plan, trust: keys.BuilderTrust | None) -> None:
    """What lets the builder push, checked only when it will push: ``build`` leaves the target
    alone, and a target already on its system needs nothing."""
    if trust is None or not target_plan.action.copies:
        return
    ssh.authorized_key(
        name="Authorize the builder's deploy key",
        user=spec.ssh_user or "root",
        key=trust.ssh_public_key,
    )
    nix.trusted_public_key(name="Trust paths signed by the builder", key=trust.nix_public_key)


def build_and_copy(
    spec: HostSpec,
    address: str,
    target_plan: Plan,
    builder: Builder | None,
    trust: keys.BuilderTrust | None,
    cache: RunCache,
) -> None:
    """Build on the builder, then sign and copy the closure to the target."""
    if builder is None:  # a rollback's system is on the target already
        return
    build.build_toplevel(
        name="Build the system on its builder", plan=target_plan, builder=builder, cache=cache
    )
    if trust is None:  # built on itself: nothing to copy
        return
    copy.sign_closure(
        name="Sign the closure on the builder", plan=target_plan, builder=builder, cache=cache
    )
    copy.copy_closure(
        name="Copy the closure from the builder",
        plan=target_plan,
        builder=builder,
        cache=cache,
        address=address,
        port=spec.ssh_port,
        user=spec.ssh_user or "root",
        substitute=spec.substitute_on_target,
    )


def note_reboot_needed(target_plan: Plan, builder: Builder | None, summary: RunSummary) -> None:
    """Whether the new system needs a reboot, read once it is built when planning could not
    (it was not built yet); the booted system's boot files came with the plan."""
    if builder is not None and target_plan.booted and target_plan.new_boot is None:
        reboot.note_reboot_needed(
            name="Whether the new system needs a reboot",
            plan=target_plan,
            builder=builder,
            summary=summary,
        )


def activate_target(spec: HostSpec, target_plan: Plan, safety: Safety, cache: RunCache) -> None:
    """Dry-activate (an activation dry-activates first itself), join the target's wave, and
    activate safely."""
    if not target_plan.action.activates:
        activate.dry_activate(name="Dry-activate", plan=target_plan, sudo=spec.sudo)
    checks = spec.health_checks
    if target_plan.action.activates:
        # Its wave waits for the earlier ones at execute time; builds and copies do not.
        worst = activate.worst_case(safety, checks, spec.wave_soak, spec.reboot)
        cache.waves.join(spec.name, spec.deploy_wave, worst)
    activate.activate_safely(
        name="Activate (detached, confirmed, rolled back on failure)",
        plan=target_plan,
        safety=safety,
        checks=checks,
        sudo=spec.sudo,
        waves=cache.waves,
        soak=spec.wave_soak,
        reboot=spec.reboot,
    )


def prune_target(host: Host, spec: HostSpec, target_plan: Plan) -> None:
    """Old generations pruned, then garbage collected, as the data asks; the operation runs
    only when the activation was confirmed (a failed host runs no later step)."""
    if spec.keep_generations is None and not spec.gc_after_deploy:
        return
    keep, gc, sudo = spec.keep_generations or prune.KEEP_ALL, spec.gc_after_deploy, spec.sudo
    prune.announce(host, target_plan, keep, gc, sudo)  # --dry: what would go
    prune.prune_generations(
        name="Prune old system generations", plan=target_plan, keep=keep, gc=gc, sudo=sudo
    )
