"""
Whether the new system needs a reboot to be fully in effect (``operations.core.boot``), and
the reboot itself after a confirmed switch (``reboot`` data: ``reboot_after_switch``).

The booted system's boot files are read with the target's links at planning time (no round
trip more, so a run that changes nothing costs the same); the new system's come from the
target when it already runs it, else from the builder once it has it: at planning time when it
was built already, else right after the build. The plan, ``--dry``, the summary, the report
and the metrics say it.

The reboot (``reboot: when-needed`` or ``always``) runs inside the activation's step, once the
switch is confirmed and before the host reports to its wave (a later wave waits for it):

1. ``reboot.sh prepare`` leaves a mark in ``/run`` (a reboot empties it) and, where systemd-boot
   has entries for both systems, boots the new one's entry once (``bootctl set-oneshot``) with
   the previous one's the default: a new system that does not boot falls back to the previous
   one at the next boot. extlinux (the Pis' U-Boot) has no one-shot: the new system is the
   default, and one that does not boot leaves the host down until someone picks an older
   generation at the boot menu;
2. ``reboot_command`` (as root; the bench's is its stand-in), then new SSH logins (its sshd
   restarted: pyinfra's connection is gone) until the mark is gone, up to ``reboot_timeout``;
3. ``/run/booted-system`` is read: the new system: the health checks run again, then
   ``reboot.sh commit`` makes it the default (``deployed``); the previous system:
   ``reboot.sh roll-back`` makes its generation the profile's and the boot default
   (``rolled back: booted the previous system``); no login in time: ``failed: did not come
   back after reboot``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent
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
from operations.core.process import fresh_login_run, read_lines_on
from operations.data.reboot import Reboot, RebootPolicy
from operations.push.health import run_checks
from operations.push.switch import LinksAndPending, script

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence

    from pyinfra.api.host import Host

    from operations.core.models import Builder
    from operations.core.summary import RunSummary
    from operations.data.health import HealthCheck

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


# The target's side of a reboot (reboot.sh says each step); positional values only.
_REBOOT = script("reboot.sh")
REBOOT_LINE = "nixpush-reboot "
# Where the mark a reboot clears lives (``/run`` is a tmpfs: empty after every boot).
MARK_DIR = "/run/nixpush"
# How often, and how long at most each time, a new login looks whether the host is back.
POLL_INTERVAL = 2.0
POLL_TIMEOUT = 15.0
DID_NOT_COME_BACK = "did not come back after reboot"
BOOTED_PREVIOUS = "booted the previous system"
ONE_SHOT = "one-shot"


def reboot_step(step: str, *args: str) -> StringCommand:
    """One step of reboot.sh on the target: ``reboot_step("roll-back", previous)``."""
    return StringCommand(
        "sh", "-c", QuoteString(_REBOOT), "nixpush-reboot", step, *(QuoteString(a) for a in args)
    )


def back_command(mark: str) -> StringCommand:
    """Prints ``nixpush-reboot up`` while ``mark`` is still there (not rebooted yet), else
    ``nixpush-reboot booted SYSTEM``."""
    return StringCommand(
        "if [ -e", QuoteString(mark), "]; then echo", QuoteString(REBOOT_LINE + "up"),
        "; else echo", QuoteString(REBOOT_LINE + "booted"),
        '"$(readlink -f ' + BOOTED_SYSTEM + ')"; fi',
    )  # fmt: skip


def describe_reboot(reboot: Reboot, changes: tuple[str, ...] | None) -> str | None:
    """The ``--dry`` line: whether a confirmed switch reboots (None: ``reboot: never``)."""
    if reboot.policy is RebootPolicy.NEVER:
        return None
    if reboot.policy is RebootPolicy.WHEN_NEEDED and changes is not None and not changes:
        return "reboot: when needed: not needed (the boot files do not change)"
    if reboot.policy is RebootPolicy.WHEN_NEEDED and changes is None:
        when = "if the new system's boot files differ (known once it is built)"
    else:
        when = "after the confirmed switch"
    return (
        f"reboot: {when}, waiting up to {reboot.timeout}s for it; with systemd-boot the new "
        "generation boots once and becomes the default only once healthy, else (extlinux) a "
        "new system that does not boot leaves the host down until an older generation is "
        "picked at the boot menu"
    )


@dataclass(frozen=True)
class AfterReboot:
    """
    How a reboot after a confirmed switch ended: ``deployed``, ``rolled-back`` or ``failed``,
    and why (the activation reports it as its own outcome).
    """

    status: str
    cause: str = ""


@dataclass(frozen=True)
class RebootRun:
    """
    One reboot after a confirmed switch, as the activation hands it over.

    + plan: the target's plan (``desired`` runs now; ``current`` ran before)
    + reboot: the host's ``reboot`` data
    + checks, systemd, sudo: the host's health checks, whether it has systemd, sudo or not
    """

    plan: Plan
    reboot: Reboot
    checks: tuple[HealthCheck, ...]
    systemd: bool
    sudo: bool


def reboot_after_switch(
    target: Host,
    run: RebootRun,
    say: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = gevent.sleep,
) -> AfterReboot:
    """
    Reboot ``target`` (its switch to ``run.plan.desired`` confirmed), wait for it, verify
    what it booted and its health; every command over a new SSH login (the reboot ends
    pyinfra's connection).

    .. code:: python

        reboot_after_switch(host, RebootRun(plan, spec.reboot, checks, True, False), log)
    """
    plan, sudo = run.plan, run.sudo
    new, previous = plan.desired, plan.current or ""

    def on_target(
        command: StringCommand, timeout: float, stdin: str | None = None
    ) -> tuple[bool, list[str]] | None:
        # stdin: a URL check's credentials (health checks again after the reboot).
        return fresh_login_run(target, command, sudo=sudo, timeout=timeout, stdin=stdin)

    mark = f"{MARK_DIR}/reboot-{uuid.uuid4().hex[:12]}"
    prepared = on_target(reboot_step("prepare", mark, new, previous), 60)
    if prepared is None or not prepared[0]:
        return AfterReboot("failed", f"preparing the reboot failed: {_last(prepared)}")
    words = next(
        (x[len(REBOOT_LINE) :].split() for x in prepared[1] if x.startswith(REBOOT_LINE)), []
    )
    one_shot = bool(words) and words[0] == ONE_SHOT
    say(
        f"rebooting: the new system's entry {words[1]} boots once, {words[2]} stays the default"
        if one_shot and len(words) == 3
        else "rebooting into the boot default (no one-shot entry here)"
    )
    command = StringCommand(*(QuoteString(word) for word in run.reboot.command))
    started = clock()
    answer = on_target(command, 30)
    if answer is not None and not answer[0] and any(line.strip() for line in answer[1]):
        restored = on_target(reboot_step("commit"), 30) if one_shot else (True, [])
        kept = "" if restored and restored[0] else "; restoring its boot default failed"
        return AfterReboot(
            "failed", f"the reboot command failed: {_last(answer)}; it still runs {new}{kept}"
        )
    booted = _wait_until_back(on_target, mark, started + run.reboot.timeout, clock, sleep)
    if booted is None:
        after = (
            f"its next boot takes the previous system {previous} (the one-shot entry is used)"
            if one_shot
            else f"its boot default is {new}"
        )
        return AfterReboot(
            "failed",
            f"{DID_NOT_COME_BACK} (no SSH login within reboot_timeout={run.reboot.timeout}s); "
            f"{after}",
        )
    return _came_back(run, on_target, booted, one_shot=one_shot, say=say)


def _came_back(
    run: RebootRun,
    on_target: Callable[..., tuple[bool, list[str]] | None],
    booted: str,
    *,
    one_shot: bool,
    say: Callable[[str], None],
) -> AfterReboot:
    """The outcome once the target answers again, by what it booted: the new system (health
    checks again, then made the boot default), the previous one (the profile rolled back), or
    anything else."""
    new, previous = run.plan.desired, run.plan.current or ""
    if booted == new:
        say(f"came back on {new}")
        problem = run_checks(
            run.checks,
            systemd=run.systemd,
            run=on_target,
            log=lambda m: say(f"after the reboot: {m}"),
        )
        if problem is not None:
            stays = f"; its boot default stays {previous}" if one_shot else ""
            return AfterReboot("failed", f"after the reboot: {problem}; it runs {new}{stays}")
        committed = on_target(reboot_step("commit"), 30) if one_shot else (True, [])
        if committed is None or not committed[0]:
            return AfterReboot(
                "failed",
                f"it came back healthy on {new}, but making it the boot default failed: "
                f"{_last(committed)}",
            )
        return AfterReboot("deployed")
    if previous and booted == previous:
        say(f"came back on the previous system {previous}: rolling the profile back")
        rolled = on_target(reboot_step("roll-back", previous), 120)
        if rolled is None or not rolled[0]:
            return AfterReboot(
                "failed",
                f"{BOOTED_PREVIOUS} {previous}, but rolling the profile back failed: "
                f"{_last(rolled)}",
            )
        return AfterReboot("rolled-back", BOOTED_PREVIOUS)
    return AfterReboot("failed", f"after the reboot it runs {booted or 'nothing'}, not {new}")


def _wait_until_back(
    on_target: Callable[[StringCommand, float], tuple[bool, list[str]] | None],
    mark: str,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> str | None:
    """What the target booted, once a new login finds the mark gone; None: not by
    ``deadline``."""
    while clock() < deadline:
        sleep(POLL_INTERVAL)
        left = deadline - clock()
        if left <= 0:
            break
        answer = on_target(back_command(mark), min(POLL_TIMEOUT, max(left, 1.0)))
        if answer is None or not answer[0]:
            continue
        for line in answer[1]:
            if line.startswith(REBOOT_LINE + "booted"):
                return line[len(REBOOT_LINE + "booted") :].strip()
    return None


def _last(answer: tuple[bool, list[str]] | None) -> str:
    """The last line a command said (or why there is none)."""
    if answer is None:
        return "the target could not be reached"
    lines = [line.strip() for line in answer[1] if line.strip()]
    return lines[-1] if lines else "failed without output"
