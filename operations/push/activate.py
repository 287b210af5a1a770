"""
Step 4, activate: ``switch-to-configuration dry-activate`` first, always, with its report
shown; then, for switch/boot/test, the system profile and ``switch-to-configuration ACTION``;
then verify that the target runs (or, for boot, will boot) the desired system.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.failures import fail, host_step
from operations.models import Plan
from operations.process import run_on
from operations.push.commands import (
    StorePathLink,
    nix_error,
    set_profile_command,
    switch_command,
)

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


@operation()
def dry_activate(plan: Plan, sudo: bool) -> Generator[PyinfraCommand, None, None]:
    """
    Run ``switch-to-configuration dry-activate`` and show its report; changes nothing.

    + plan: the target's ``Plan``
    + sudo: run it with sudo (a non-root deploy user)

    **Example:**

    .. code:: python

        activate.dry_activate(plan=plan, sudo=True)
    """
    if plan.up_to_date or not plan.action.copies:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to activate")
        return
    yield FunctionCommand(_dry_activate, (plan, sudo), {})


@host_step
def _dry_activate(state: State, host: Host, plan: Plan, sudo: bool) -> bool:
    ok, lines = run_on(
        host,
        switch_command(plan.desired, "dry-activate"),
        sudo=sudo,
        doing=f"dry-activating {plan.desired}",
    )
    for line in lines:
        host.log_styled(f"dry-activate: {line}", log_func=logger.info)
    if not ok:
        return fail(host, f"dry-activate of {plan.desired} failed: {nix_error(lines)}")
    return True


@operation()
def activate(plan: Plan, sudo: bool) -> Generator[PyinfraCommand, None, None]:
    """
    Make the plan's system current (``switch``/``test``) and/or the boot default
    (``switch``/``boot``), then check that the target really runs or boots it.

    + plan: the target's ``Plan``
    + sudo: run with sudo (a non-root deploy user)

    **Example:**

    .. code:: python

        activate.activate(plan=plan, sudo=True)
    """
    if plan.up_to_date or not plan.action.activates:
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: no activation")
        return
    if plan.action.sets_profile:
        yield set_profile_command(plan.desired)
    yield switch_command(plan.desired, plan.action.value)
    yield FunctionCommand(_verify, (plan, sudo), {})


@host_step
def _verify(state: State, host: Host, plan: Plan, sudo: bool) -> bool:
    link = plan.action.verified_link
    ok, lines = run_on(
        host, StorePathLink().command(link), sudo=sudo, doing=f"reading {link} after activation"
    )
    now = lines[0].strip() if ok and lines else None
    if now != plan.desired:
        return fail(host, f"after {plan.action}, {link} is {now or 'missing'}, not {plan.desired}")
    verb = "boots" if plan.action.sets_profile and not plan.action.makes_current else "runs"
    host.log_styled(f"{plan.target} now {verb} {plan.desired}", log_func=logger.info)
    return True
