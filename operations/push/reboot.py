"""
Whether the new system needs a reboot to be fully in effect (``operations.core.boot``).

The booted system's boot files are read with the target's links at planning time (no round
trip more, so a run that changes nothing costs the same); the new system's come from the
target when it already runs it, else from the builder once it has it: at planning time when it
was built already, else right after the build. The plan, ``--dry``, the summary, the report
and the metrics say it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from typing_extensions import override

from operations.core.boot import BOOT_FILES, BOOT_LINE, BOOTED_SYSTEM, BootFiles, describe
from operations.core.boot import parse_boot_lines as _parse
from operations.core.failures import host_step
from operations.core.models import CURRENT_SYSTEM, Plan
from operations.core.process import read_lines_on
from operations.push.switch import LinksAndPending

if TYPE_CHECKING:
    from collections.abc import Generator, Sequence

    from pyinfra.api.host import Host

    from operations.core.models import Builder
    from operations.core.summary import RunSummary

READING_BOOT_FILES = "reading the new system's boot files"


def boot_files_command(systems: Sequence[str]) -> StringCommand:
    """Prints ``nixpush-boot SYSTEM FILE VALUE`` for each of ``systems`` (``absent`` for a
    path that is not there); world-readable: no sudo."""
    return StringCommand(
        "for s in", *(QuoteString(s) for s in systems), "; do",
        'if [ ! -e "$s" ]; then echo "' + BOOT_LINE + '$s absent"; continue; fi;',
        "for f in", *BOOT_FILES[:-1], "; do",
        'echo "' + BOOT_LINE + '$s $f $(readlink -f "$s/$f" 2>/dev/null)"; done;',
        'echo "' + BOOT_LINE + '$s kernel-params $(cat "$s/kernel-params" 2>/dev/null)"; done',
    )  # fmt: skip


_Links = tuple[str | None, str | None, str | None]


class LinksPendingAndBoot(FactBase[tuple[_Links, dict[str, BootFiles]]]):
    """``LinksAndPending`` and the boot files of the booted and the current system, in one
    command: ``((current, profile, pending), {system path: BootFiles})``."""

    @override
    def command(self) -> StringCommand:
        booted = boot_files_command((BOOTED_SYSTEM, CURRENT_SYSTEM))
        return StringCommand(LinksAndPending().command(), ";", booted)

    @staticmethod
    def default() -> tuple[_Links, dict[str, BootFiles]]:
        return LinksAndPending.default(), {}

    @override
    def process(self, output: list[str]) -> tuple[_Links, dict[str, BootFiles]]:
        rest = [line for line in output if not line.startswith(BOOT_LINE)]
        return LinksAndPending().process(rest), _parse(output)


def booted_and_current(boot: dict[str, BootFiles]) -> tuple[BootFiles | None, BootFiles | None]:
    """The booted system's and the current one's boot files, from ``LinksPendingAndBoot``."""
    return boot.get(BOOTED_SYSTEM), boot.get(CURRENT_SYSTEM)


def read_boot_files(on: Host, system: str, *, doing: str = READING_BOOT_FILES) -> BootFiles | None:
    """``system``'s boot files, read on host ``on`` (None: not there)."""
    lines = read_lines_on(on, boot_files_command((system,)), sudo=False, doing=doing)
    return _parse(lines).get(system)


def log_reboot(target: Host, plan: Plan) -> None:
    """Say in the plan (and ``--dry``) whether the new system needs a reboot, when known."""
    changes = plan.reboot_changes
    if changes:
        target.log_styled(describe(changes), fg="yellow", log_func=logger.warning)


@operation(is_idempotent=False)
def note_reboot_needed(
    plan: Plan, builder: Builder, summary: RunSummary
) -> Generator[FunctionCommand, None, None]:
    """
    After the build, read the new system's boot files on the builder and record whether the
    target needs a reboot (when planning could not tell: it was not built then).

    + plan: the target's plan (its ``booted`` boot files read at planning time)
    + builder: where the new system was built
    + summary: the run's summary, which reports it

    .. code:: python

        note_reboot_needed(name="Whether a reboot is needed", plan=plan, builder=builder,
                           summary=summary)
    """
    if plan.booted is None or plan.new_boot is not None:
        host.noop("whether a reboot is needed was known when planning")
        return

    @host_step
    def note(state: object, target: Host) -> bool:
        new = read_boot_files(builder.host, plan.desired)
        if new is not None and plan.booted is not None:
            changes = plan.booted.changes_to(new)
            summary.reboot_needed(target.name, changes)
            if changes:
                target.log_styled(describe(changes), fg="yellow", log_func=logger.warning)
        return True

    yield FunctionCommand(note, (), {})
