"""
Step 2, build: the target's toplevel on its builder, once per run however many targets
share it (targets build in parallel; those sharing a store path wait for the first).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from gevent.lock import Semaphore
from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.failures import fail, host_step
from operations.models import Builder, Plan
from operations.process import run_on
from operations.push.commands import build_command, built_paths, nix_error
from operations.summary import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

_built: set[tuple[str, str]] = set()
_locks: dict[tuple[str, str], Semaphore] = {}


@operation()
def build_toplevel(plan: Plan, builder: Builder) -> Generator[PyinfraCommand, None, None]:
    """
    Build the plan's toplevel on its builder, once however many targets share it.

    + plan: the target's ``Plan``
    + builder: its ``Builder``

    **Example:**

    .. code:: python

        build.build_toplevel(plan=plan, builder=builder)
    """
    if plan.up_to_date:
        host.noop(plan.noop_reason)
        return
    if plan.built:
        host.noop(f"{plan.builder} has already built {plan.desired}")
        return
    yield FunctionCommand(_build, (plan, builder), {})


@host_step
def _build(state: State, host: Host, plan: Plan, builder: Builder) -> bool:
    key = (builder.host.name, plan.desired)
    with _locks.setdefault(key, Semaphore()):
        if key in _built:
            return True
        ok, lines = run_on(
            builder.host,
            build_command(plan.attr),
            sudo=builder.sudo,
            doing=f"building {plan.attr}",
        )
        if not ok or plan.desired not in built_paths(lines):
            cause = f"building {plan.attr} on {plan.builder} failed: {nix_error(lines)}"
            if host.name != plan.target:  # built from the builder's run: the target's failure
                summary_for(state).fail(plan.target, cause)
            return fail(host, cause)
        _built.add(key)
    host.log_styled(f"built {plan.desired} on {plan.builder}", log_func=logger.info)
    return True
