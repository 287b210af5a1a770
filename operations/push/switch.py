"""
What runs on the target during an activation, detached from the SSH session: the program, the
commands that start it, follow it, confirm or reject it, and how their answers read.

1. ``launch_command`` waits (up to ``ActivationRun.lock_wait``) until no other activation holds
   the host's lock (``/run/nixpush/lock``) and holds it until the program holds it (install.sh
   says how, for a unit too), installs ``PROGRAM`` (``switch.sh``, given on stdin, checked
   against its SHA-256: a truncated upload starts nothing) into a root-only run directory,
   ``/run/nixpush/<id>/``, and starts it detached: a transient systemd unit
   ``nixpush-switch-<id>`` where the target has systemd (output in its journal), else a
   ``setsid`` process (output in ``<run dir>/output``). Neither belongs to the session, so a
   dropped link, Ctrl-C or a killed controller cannot interrupt it.
2. The program holds the host's lock until it ends (its holder, id, start and controller, is
   written in the lock file, world-readable: the planner reads it with the links). It pins the
   previous and the new system as GC roots (``/nix/var/nix/gcroots/nixpush-<id>``, removed at
   its end), then removes the root the copy made (``COPIED_ROOTS``), and is its own watchdog,
   armed before anything changes: it records what the target runs and boots, runs
   ``switch-to-configuration`` (bounded by ``activation_timeout``), then waits up to
   ``confirm_timeout`` seconds, measured on the time since boot (the wall clock steps), for a
   confirmation (``confirm_command``). With a rollback armed, ``switch`` activates as ``test``
   and only once confirmed sets the system profile and runs the new system's
   ``switch-to-configuration boot``: a reboot in the window comes back on the old system.
   Without a confirmation, on a rejection (``reject_command``) or when
   ``switch-to-configuration`` exits non-zero, it rolls back: the previous system's
   ``switch-to-configuration test``, and when it had set the profile, the profile back and only
   the generation this run created deleted, the previous boot default restored. Its state is in
   ``<run dir>/status``; ``follow_command`` reads it with the output.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.facts import FactBase

from operations.core.models import SYSTEM_PROFILE, Action, Plan, Safety
from operations.push.commands import SystemLinks, switch_command
from operations.push.programs import program

RUN_ROOT = "/run/nixpush"
UNIT_PREFIX = "nixpush-switch-"
STATUS_MARK = "@@nixpush-status@@"
LAUNCHED_MARK = "@@nixpush-launched@@"
CONFIRMED_MARK = "@@nixpush-confirmed@@"
DRY_ACTIVATED_MARK = "@@nixpush-dry-activated@@"
PENDING_MARK = "@@nixpush-pending@@"
BYTES_MARK = "@@nixpush-bytes@@"
LOCK = f"{RUN_ROOT}/lock"
AWAITING = "awaiting-confirmation"
TERMINAL = ("confirmed", "done", "failed", "rolled-back", "rollback-failed", "missing")
# States the program passes through on its own; every other one wants the controller (it
# confirms, or reports the outcome). follow.sh names them and TERMINAL too (a test compares).
TRANSIENT = ("starting", "activating", "committing", "rolling-back")
# Every state a run can be in: those the program writes (``status <state>`` in switch.sh) and
# ``missing`` (no run directory). The README's table of states lists the same.
STATES = ("starting", "activating", AWAITING, "committing", "rolling-back", *TERMINAL)

# -- the program that runs on the target -----------------------------------------------

# The program (switch.sh beside this file, package data): POSIX sh, run as root.
PROGRAM = program("switch.sh")
PROGRAM_SHA256 = hashlib.sha256(PROGRAM.encode()).hexdigest()


def script(name: str) -> str:
    """A shell program beside this module (package data, shellchecked), without its leading
    comment block: it travels in the command line (``sh -c``) of every call."""
    lines = program(name).splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


# Installs the program and starts it once the host's lock is free (install.sh says how).
INSTALL = script("install.sh")

# Answers with the news since the last answer (follow.sh says how).
FOLLOW = script("follow.sh")

# Runs a command and prints its output as hex after BYTES_MARK (encoded.sh says why).
ENCODED = script("encoded.sh")

# The confirmation and the rejection race the program's own timeout for one rename: exactly
# one of confirmed, rejected, expired wins. A confirmation sent again (its answer was lost)
# finds itself there.
TOO_LATE = "nixpush: no confirmation awaited"
CONFIRM = (
    'mv "$1/awaiting" "$1/confirmed" 2>/dev/null || [ -e "$1/confirmed" ] || '
    f'{{ echo "{TOO_LATE}"; exit 1; }}'
)
REJECT = 'printf "%s\\n" "$2" > "$1/reject-cause" && mv "$1/awaiting" "$1/rejected"'


# -- the system profile's generations --------------------------------------------------


class SystemGenerations(FactBase[dict[str, Any]]):
    """
    The system profile's generations: ``{"current": 12, "paths": {11: "/nix/store/...", ...}}``
    (``current`` None when there is no profile).
    """

    def command(self) -> StringCommand:
        return StringCommand(
            "for l in",
            f"{SYSTEM_PROFILE}-*-link",
            '; do [ -L "$l" ] && echo "$l $(readlink -f "$l")"; done;',
            "echo current",
            f"$(readlink {SYSTEM_PROFILE} 2>/dev/null)",
        )

    @staticmethod
    def default() -> dict[str, Any]:
        return {"current": None, "paths": {}}

    def process(self, output: list[str]) -> dict[str, Any]:
        paths: dict[int, str] = {}
        current: int | None = None
        for line in output:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "current":
                current = generation_number(parts[1])
            elif len(parts) == 2:
                number = generation_number(parts[0].rsplit("/", 1)[-1])
                if number is not None:
                    paths[number] = parts[1]
        return {"current": current, "paths": paths}


def generation_number(link: str) -> int | None:
    """``generation_number("system-12-link") == 12``."""
    middle = link.removeprefix("system-").removesuffix("-link")
    return int(middle) if middle.isdecimal() else None


# -- the activation pending on a target -------------------------------------------------

# The lock file's holder (world-readable), each line prefixed ``pending-``, and whether its
# program still runs; nothing when no activation holds it. Shell builtins only.
PENDING_READ = (
    'if [ -s "$l" ]; then while IFS= read -r x; do echo "pending-$x"; '
    'case $x in pid=*) if [ -d "/proc/${x#pid=}" ]; then echo pending-alive=1; fi ;; esac; '
    'done < "$l"; fi'
)


class LinksAndPending(FactBase[tuple[str | None, str | None, str | None]]):
    """
    ``SystemLinks`` and the activation pending on the target (``pending_activation``), in one
    command: ``(current, profile, pending)``. ``lock``: the host's lock file (tests move it).
    """

    def command(self, lock: str = LOCK) -> StringCommand:
        return StringCommand(
            SystemLinks().command(), ";", StringCommand("l=", QuoteString(lock), _separator=""),
            ";", PENDING_READ,
        )  # fmt: skip

    @staticmethod
    def default() -> tuple[str | None, str | None, str | None]:
        return None, None, None

    def process(self, output: list[str]) -> tuple[str | None, str | None, str | None]:
        links = [line for line in output if not line.startswith("pending-")]
        current, profile = SystemLinks().process(links)
        return current, profile, pending_activation(output)


def pending_activation(lines: Sequence[str], held: bool = False) -> str | None:
    """Who holds the host's lock, from its lock file's lines (prefixed ``pending-`` or not):
    ``"activation <id>, started <when> by <controller>"``; None when nobody does. ``held``: the
    lock is known to be held, else the ``alive`` line says whether its program still runs."""
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.strip().removeprefix("pending-").partition("=")
        if sep:
            fields[key] = value
    if "id" not in fields:
        return None
    text = (
        f"activation {fields['id']}, started {fields.get('started', '?')} by "
        f"{fields.get('controller') or '?'}"
    )
    if held or "alive" in fields:
        return text
    return f"{text} (its program is gone: it never finished)"


# -- the copied closure, held from the copy until the program holds it --------------------

# Direct GC roots (symlinks into the store; Nix 2.8 reads them anywhere under gcroots, and a
# dangling one until the copy ends is skipped) that the copy makes before it starts: a
# `nix-store --gc` between the copy and the activation (another controller's gc_after_deploy,
# the owner's, while a later wave waits) cannot delete the closure. The program removes its
# own once it pins the new system itself; its sweep of dead runs' roots skips this directory,
# except for roots a day old (a run that never launched: held, failed, stopped).
COPIED_ROOTS = "/nix/var/nix/gcroots/nixpush-copied"


def controller_name() -> str:
    """Who runs this controller: ``user@machine pid N``."""
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def copy_root_name(desired: str) -> str:
    """The name of the copy's GC root for ``desired``, under ``COPIED_ROOTS``: this controller's
    own (two controllers copying one system never share a root one of them removes)."""
    return hashlib.sha256(f"{controller_name()}\n{desired}".encode()).hexdigest()[:32]


def pin_copy_command(desired: str) -> StringCommand:
    """Make the copy's GC root for ``desired`` (run as root, before the copy)."""
    root = f"{COPIED_ROOTS}/{copy_root_name(desired)}"
    return StringCommand(
        "mkdir", "-p", COPIED_ROOTS, "&&", "ln", "-sfn", QuoteString(desired), QuoteString(root)
    )


# -- one activation run and its commands -----------------------------------------------


@dataclass(frozen=True)
class ActivationRun:
    """
    One detached activation on one target.

    + id: unique per run (names the run directory and the systemd unit)
    + action: what ``switch-to-configuration`` is asked to do (``switch`` for a rollback)
    + desired: the system to activate
    + generation: an existing profile generation to switch to (rollback), else None
    + safety: the timers and whether the target rolls back
    + systemd: start it as a transient unit (the target has systemd), else with ``setsid``
    + controller: who launched it (``user@machine pid N``), for a run that finds it pending
    + copied: the name of the GC root the copy made (``copy_root_name``), which the program
      removes once it holds the system itself; empty: none
    """

    id: str
    action: str
    desired: str
    generation: int | None
    safety: Safety
    systemd: bool
    controller: str = ""
    copied: str = ""

    @classmethod
    def create(cls, plan: Plan, safety: Safety, systemd: bool) -> ActivationRun:
        generation = None
        if plan.action is Action.ROLLBACK:
            generation = generation_number(plan.attr.rsplit("/", 1)[-1])
        return cls(
            id=f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(4).hex()}",
            action="switch" if plan.action is Action.ROLLBACK else plan.action.value,
            desired=plan.desired,
            generation=generation,
            safety=safety,
            systemd=systemd,
            controller=controller_name(),
            copied=copy_root_name(plan.desired),
        )

    @property
    def dir(self) -> str:
        return f"{RUN_ROOT}/{self.id}"

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.id}"

    @property
    def rolls_back(self) -> bool:
        return self.safety.rollback and self.action != "boot"

    @property
    def lock_wait(self) -> int:
        """How long the launch waits for another activation to end: what one with the same
        timers takes to be confirmed or to roll back once it awaits confirmation."""
        return self.safety.confirm_timeout + self.safety.activation_timeout


def program_args(run: ActivationRun) -> list[QuoteString]:
    """PROGRAM's positional arguments."""
    values = (
        run.dir,
        run.action,
        run.desired,
        "" if run.generation is None else str(run.generation),
        "1" if run.rolls_back else "0",
        str(run.safety.confirm_timeout),
        str(run.safety.activation_timeout),
        run.controller,
        run.copied,
    )
    return [QuoteString(value) for value in values]


def setsid_starter(run: ActivationRun) -> list[Any]:
    """Without systemd: a new session (``setsid -f`` forks), output into the run directory."""
    return ["setsid", "-f", "sh", QuoteString(f"{run.dir}/program"), *program_args(run)]


def systemd_starter(run: ActivationRun) -> list[Any]:
    """
    With systemd: a transient unit, output to the journal (no ``--pipe``: the unit must not
    depend on the session); ``--setenv=PATH`` passes sudo's PATH on (a unit's default PATH
    lacks NixOS's /run/current-system/sw/bin).
    """
    return [
        "systemd-run",
        QuoteString(f"--unit={run.unit}"),
        "--collect",
        "--no-ask-password",
        "--service-type=exec",
        # A stop rolls back: time for it (two switch-to-configuration runs at worst).
        f"--property=TimeoutStopSec={2 * run.safety.activation_timeout + 30}",
        "--quiet",
        "--setenv=PATH",
        "sh",
        QuoteString(f"{run.dir}/program"),
        *program_args(run),
    ]


def launch_command(run: ActivationRun) -> StringCommand:
    """Once no other activation holds the host's lock, install PROGRAM (given on stdin) into
    the run directory and start it detached."""
    starter = systemd_starter(run) if run.systemd else setsid_starter(run)
    return StringCommand(
        "sh", "-c", QuoteString(INSTALL), "nixpush-launch", QuoteString(run.dir),
        PROGRAM_SHA256, str(run.lock_wait), QuoteString(run.controller),
        "1" if run.systemd else "0", *starter,
    )  # fmt: skip


def launch_and_follow_command(run: ActivationRun, wait: int) -> StringCommand:
    """``launch_command``, then ``LAUNCHED_MARK`` and the first follow's answer (at the first
    state that wants the controller): one round trip. Without the mark the run did not start;
    with it, a command that failed lost its follow, not the run."""
    return then_follow(launch_command(run), LAUNCHED_MARK, run, 0, "", wait)


def encoded_command(command: StringCommand) -> StringCommand:
    """``command`` (its stdin empty, its stderr in its stdout) with its output as hex after
    ``BYTES_MARK``: any bytes reach the controller (``decode_output`` reads them)."""
    return StringCommand("sh", "-c", QuoteString(ENCODED), "nixpush-encoded", command)


def dry_activate_and_launch_command(run: ActivationRun, wait: int) -> StringCommand:
    """``switch-to-configuration dry-activate`` of the new system (its report first, encoded,
    its stdin kept from the program's), then ``DRY_ACTIVATED_MARK`` and
    ``launch_and_follow_command``: nothing is launched unless the dry activation passed."""
    return StringCommand(
        encoded_command(switch_command(run.desired, "dry-activate")), "&& echo",
        DRY_ACTIVATED_MARK, "&&", launch_and_follow_command(run, wait),
    )  # fmt: skip


def confirm_and_follow_command(run: ActivationRun, seen: int, wait: int) -> StringCommand:
    """``confirm_command``, then ``CONFIRMED_MARK`` and a follow's answer (the program's
    ``confirmed``, once it noticed): the confirmation and its outcome in one round trip."""
    return then_follow(confirm_command(run), CONFIRMED_MARK, run, seen, AWAITING, wait)


def then_follow(
    first: StringCommand, mark: str, run: ActivationRun, seen: int, known: str, wait: int
) -> StringCommand:
    """``first``; once it succeeded, ``mark`` and a ``follow_command``'s answer."""
    return StringCommand(first, "&& echo", mark, "&&", follow_command(run, seen, known, wait))


def split_at_mark(lines: Sequence[str], mark: str) -> tuple[list[str], list[str] | None]:
    """A ``then_follow`` answer: the lines before ``mark`` and those after it; None after it
    when it is not there (the first command failed), every line before it then."""
    at = next((i for i, line in enumerate(lines) if line.strip() == mark), None)
    if at is None:
        return list(lines), None
    return list(lines[:at]), list(lines[at + 1 :])


def follow_command(run: ActivationRun, seen: int, known: str, wait: int) -> StringCommand:
    """Output lines after the first ``seen``, once there is news or ``wait`` s passed."""
    return StringCommand(
        "sh", "-c", QuoteString(FOLLOW), "nixpush-follow", QuoteString(run.dir), str(seen),
        QuoteString(known), str(wait), QuoteString(run.unit if run.systemd else ""),
    )  # fmt: skip


def confirm_command(run: ActivationRun) -> StringCommand:
    return StringCommand("sh", "-c", QuoteString(CONFIRM), "nixpush-confirm", QuoteString(run.dir))


def reject_command(run: ActivationRun, cause: str) -> StringCommand:
    return StringCommand(
        "sh", "-c", QuoteString(REJECT), "nixpush-reject", QuoteString(run.dir),
        QuoteString(cause.replace("\n", " ")),
    )  # fmt: skip


# -- following the run -----------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One follow answer: new output lines, the program's status, and the links now."""

    lines: list[str]
    status: dict[str, str]

    @property
    def state(self) -> str:
        return self.status.get("state", "starting")


_HEX_LINE = re.compile(r"( +[0-9a-f]{2})+ *")


def decode_output(output: Sequence[str]) -> list[str]:
    """Output lines with every ``BYTES_MARK`` block (the mark, then ``od``'s hex lines) read
    back into the lines it encodes, bytes that are not UTF-8 replaced (U+FFFD)."""
    lines: list[str] = []
    hex_lines: list[str] | None = None
    for line in [*output, ""]:
        if hex_lines is not None and _HEX_LINE.fullmatch(line):
            hex_lines.append(line)
            continue
        if hex_lines is not None:
            text = bytes.fromhex("".join(hex_lines)).decode("utf-8", errors="replace")
            lines += text.removesuffix("\n").split("\n") if text else []
            hex_lines = None
        if line.strip() == BYTES_MARK:
            hex_lines = []
        else:
            lines.append(line)
    return lines[:-1]


def parse_follow(output: Sequence[str]) -> Progress:
    """Split a follow answer at its last STATUS_MARK (its lines decoded: ``decode_output``)."""
    lines = decode_output(output)
    marks = [i for i, line in enumerate(lines) if line.strip() == STATUS_MARK]
    if not marks:
        return Progress(lines, {})
    at = marks[-1]
    status: dict[str, str] = {}
    for line in lines[at + 1 :]:
        key, sep, value = line.partition("=")
        if sep:
            status[key.strip()] = value.strip()
    return Progress(lines[:at], status)
