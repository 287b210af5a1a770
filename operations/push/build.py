"""
Step 2, build: every toplevel a builder needs this run, in one ``nix build`` on it (Nix
schedules the derivations, with its ``max-jobs``), going on past failures so that a failing
build fails only the targets that need it. The first target to reach this step builds for
all of its builder's targets; the others wait and take their result. A long build shows its
progress (derivations built of the total, the current ones); ``build_timeout`` stops it.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.builder.nix_commands import nix_error
from operations.core.failures import DeployFailed, fail, host_step
from operations.core.models import Builder, Plan
from operations.core.process import run_on
from operations.core.runstate import summary_for
from operations.push.commands import (
    build_all_command,
    build_progress,
    failure_for,
    logged,
    missing_outputs_command,
    not_built,
    plain_output,
    read_build_log_command,
)
from operations.push.progress import run_watched, shower
from operations.push.runcache import RunCache
from operations.push.where import (
    OTHER_KEY,
    REFUSED,
    built_on,
    host_key_check_command,
    progress_with_machines,
    remote_builds,
    skipped_members,
)

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


@operation()
def build_toplevel(
    plan: Plan, builder: Builder, cache: RunCache
) -> Generator[PyinfraCommand, None, None]:
    """
    Build the plan's toplevel on its builder, in one build with every other toplevel that
    builder needs this run.

    + plan: the target's ``Plan``
    + builder: its ``Builder``
    + cache: the run's ``RunCache`` (``deploy.cache``): the plans the one build covers

    **Example:**

    .. code:: python

        build.build_toplevel(plan=plan, builder=builder, cache=deploy.cache)
    """
    if plan.up_to_date:
        host.noop(plan.noop_reason)
        return
    if plan.built:
        host.noop(f"{plan.builder} has already built {plan.desired}")
        return
    yield FunctionCommand(_build, (plan, builder, cache), {})


@host_step
def _build(state: State, host: Host, plan: Plan, builder: Builder, cache: RunCache) -> bool:
    key = (plan.builder, plan.desired)
    outcomes = cache.build_outcomes
    with cache.building(plan.builder):
        if key not in outcomes:
            failed = {h.name for h in state.failed_hosts}
            batch = {
                p.desired: p
                for p in cache.plans_for(plan.builder)
                if not (p.up_to_date or p.built)
                and p.target not in failed
                and (plan.builder, p.desired) not in outcomes
            }
            batch[plan.desired] = plan
            result = build_all(builder, batch)
            outcomes.update({(plan.builder, path): c for path, c in result.causes.items()})
            summary = summary_for(state)
            for path, machine in result.machines.items():
                summary.built(batch[path].target, machine)
            for member, why in result.skipped.items():
                summary.pool_skipped(plan.builder, member, _refused_or(builder, member, why))
    cause = outcomes[key]
    if cause is not None:
        reason = f"building {plan.attr} on {plan.builder} failed: {cause}"
        if host.name != plan.target:  # built from the builder's run: the target's failure
            summary_for(state).fail(plan.target, reason)
        return fail(host, reason)
    machine = summary_for(state).built_on.get(plan.target, plan.builder)
    via = f" (on pool member {machine})" if machine != plan.builder else ""
    host.log_styled(f"built {plan.desired} on {plan.builder}{via}", log_func=logger.info)
    return True


def _refused_or(builder: Builder, member: str, why: str) -> str:
    """``why`` Nix skipped ``member``, or ``REFUSED`` when its host key is another's."""
    ok, lines = run_on(
        builder.host, host_key_check_command(member), sudo=builder.sudo,
        doing=f"checking {member}'s host key",
    )  # fmt: skip
    return REFUSED if ok and OTHER_KEY in (line.strip() for line in lines) else why


@dataclass(frozen=True)
class BuildResult:
    """One ``nix build`` of a builder's toplevels: per desired path None when it is in the
    store afterwards, else why not (``causes``); per path built, the machine that built it (the
    builder's name, or its pool member's: ``machines``); the pool members Nix could not use,
    and why (``skipped``)."""

    causes: dict[str, str | None]
    machines: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def build_all(builder: Builder, plans: dict[str, Plan]) -> BuildResult:
    """Build every plan's toplevel (by desired path) in one ``nix build``."""
    paths = sorted(plans)
    installables = [plans[path].derivation or plans[path].attr for path in paths]
    targets = ", ".join(sorted(p.target for p in plans.values()))
    try:
        _, lines = run_watched(
            builder.host,
            lambda log: logged(
                build_all_command(installables), log, builder.build_timeout,
                then=missing_outputs_command(paths),
            ),
            describe=lambda log: progress_with_machines(build_progress(log), log),
            show=shower(builder.host, f"building for {targets}"),
            sudo=builder.sudo,
            doing=f"building {len(paths)} toplevels",
            timeout=builder.build_timeout,
            timeout_key="build_timeout",
            read=read_build_log_command,
        )  # fmt: skip
    except DeployFailed as failure:
        return BuildResult(dict.fromkeys(paths, str(failure)))
    skipped = skipped_members(lines)
    missing = not_built(lines)
    if missing is None:  # it never got as far as checking
        return BuildResult(dict.fromkeys(paths, nix_error(plain_output(lines))), skipped=skipped)
    builds = remote_builds(lines)
    return BuildResult(
        {path: _why_not_built(plans[path], lines) if path in missing else None for path in paths},
        {
            path: built_on(plans[path].derivation, path, builder.host.name, builds)
            for path in paths
            if path not in missing
        },
        skipped,
    )


def _why_not_built(plan: Plan, lines: Sequence[str]) -> str:
    if plan.derivation:
        named = failure_for(plan.derivation, lines)
        if named:
            return named
    return nix_error(plain_output(lines))
