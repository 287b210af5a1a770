"""
Generations kept: after a confirmed switch, the target's system generations beyond the newest
``keep_generations`` are deleted (never the booted one, the running one, nor the profile's),
then, with ``gc_after_deploy``, its store is garbage-collected; the step reports what went.

A step of its own after the activation, not part of ``switch.sh``: it runs only once the
activation was confirmed (pyinfra runs no later step on a host whose activation failed or
rolled back), and a garbage collection may take minutes that no confirmation should wait for.
It takes the host's activation lock (``/run/nixpush/lock``) while generations go, so none is
deleted under an activation awaiting its confirmation (whose rollback needs the previous
one), and lets it go before collecting (GC roots keep what a later activation pins).
``--dry`` reads what would go (``announce``: one round trip, only then).

.. code:: python

    prune.prune_generations(plan=plan, keep=3, gc=True, sudo=spec.sudo)
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.core.failures import fail, host_step
from operations.core.lock import is_dry_run
from operations.core.models import Action, Plan
from operations.core.process import run_on
from operations.push.programs import program

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

# The program (prune.sh beside this file, package data): POSIX sh, run as root, on stdin.
PROGRAM = program("prune.sh")
# ``keep`` when only gc_after_deploy is set: every generation stays.
KEEP_ALL = 2**31 - 1


@dataclass(frozen=True)
class Pruned:
    """What the program answered: the generations deleted (or that would be), those kept past
    the newest N and why, the collector's last line; ``busy``: another activation held the
    lock."""

    doomed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    collected: str | None = None
    busy: str | None = None
    complete: bool = False


def prune_command(mode: str, keep: int, gc: bool) -> StringCommand:
    """``sh -s`` with the program on stdin: ``mode`` is ``prune`` or ``dry``; ``keep`` from 1
    to ``KEEP_ALL`` (fleet.py bounds keep_generations; the program refuses anything else
    too)."""
    if not 1 <= keep <= KEEP_ALL:
        raise ValueError(f"keep is {keep}, not from 1 to {KEEP_ALL}")
    return StringCommand("sh", "-s", "--", QuoteString(mode), str(keep), "1" if gc else "0")


def parse_pruned(lines: Sequence[str]) -> Pruned:
    doomed: tuple[str, ...] = ()
    kept, collected, busy, complete = [], None, None, False
    for raw in lines:
        line = raw.strip()
        if line.startswith("nixpush-doomed"):
            doomed = tuple(line.removeprefix("nixpush-doomed").split())
            complete = True
        elif line.startswith("nixpush-kept "):
            kept.append(line.removeprefix("nixpush-kept "))
        elif line.startswith("nixpush-gc "):
            collected = line.removeprefix("nixpush-gc ")
        elif line.startswith("nixpush-busy"):
            busy = line.removeprefix("nixpush-busy").strip() or "unknown"
    return Pruned(doomed, tuple(kept), collected, busy, complete)


def describe(pruned: Pruned, keep: int, *, dry: bool) -> str:
    """One line: what went (or would go), what stayed past the newest ``keep`` and why."""
    verb = "would delete" if dry else "deleted"
    if keep == KEEP_ALL:
        return f"garbage collection: {pruned.collected}" if pruned.collected else "nothing pruned"
    plural = "s" if len(pruned.doomed) != 1 else ""
    text = f"keep_generations {keep}: " + (
        f"{verb} system generation{plural} {' '.join(pruned.doomed)}"
        if pruned.doomed
        else "no system generation to delete"
    )
    if pruned.kept:
        text += f" (kept besides: {', '.join(pruned.kept)})"
    if pruned.collected:
        text += f"; garbage collection: {pruned.collected}"
    elif pruned.doomed and not dry:
        text += "; their store paths stay until a garbage collection (gc_after_deploy)"
    return text


def announce(target: Host, plan: Plan, keep: int, gc: bool, sudo: bool) -> None:
    """Under ``--dry`` only (deploy code, prepare time: pyinfra runs no operation then), read
    and log what the switch's pruning would delete: one round trip."""
    if not is_dry_run() or plan.up_to_date or plan.action is not Action.SWITCH:
        return
    ok, lines = run_on(
        target, prune_command("dry", keep, gc), sudo=sudo, stdin=PROGRAM,
        doing="reading the system generations",
    )  # fmt: skip
    pruned = parse_pruned(lines)
    if ok and pruned.complete:
        target.log_styled(describe(pruned, keep, dry=True), log_func=logger.info)


@operation()
def prune_generations(
    plan: Plan, keep: int, gc: bool, sudo: bool
) -> Generator[PyinfraCommand, None, None]:
    """
    After a confirmed switch, delete the target's system generations beyond the newest
    ``keep`` (never the booted, the running or the profile's one), then collect garbage if
    ``gc``; report what went.

    + plan: the target's ``Plan``; only a ``switch`` prunes
    + keep: ``keep_generations``
    + gc: ``gc_after_deploy``
    + sudo: run with sudo (a non-root deploy user)

    **Example:**

    .. code:: python

        prune.prune_generations(plan=plan, keep=3, gc=False, sudo=spec.sudo)
    """
    if plan.up_to_date or plan.action is not Action.SWITCH:
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: nothing pruned")
        return
    yield FunctionCommand(_prune, (keep, gc, sudo), {})


@host_step
def _prune(state: State, host: Host, keep: int, gc: bool, sudo: bool) -> bool:
    doing = "pruning the system generations"
    command = prune_command("prune", keep, gc)
    ok, lines = run_on(host, command, sudo=sudo, stdin=PROGRAM, doing=doing)
    pruned = parse_pruned(lines)
    if pruned.busy is not None:
        host.log_styled(
            f"{doing}: skipped, another activation holds the lock ({pruned.busy})",
            fg="yellow",
            log_func=logger.warning,
        )
        return True
    if not ok or not pruned.complete:
        last = lines[-1].strip() if lines else "no output"
        return fail(host, f"{doing} failed: {last}")
    host.log_styled(describe(pruned, keep, dry=False), log_func=logger.info)
    return True
