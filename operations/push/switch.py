"""
What runs on the target during an activation, detached from the SSH session: the program, the
commands that start it, follow it, confirm or reject it, and how their answers read.

1. ``launch_command`` waits (up to ``ActivationRun.lock_wait``) until no other activation holds
   the host's lock (``/run/nixpush/lock``), installs ``PROGRAM`` (``switch.sh``, given on
   stdin, checked against its SHA-256: a truncated upload starts nothing) into a root-only run
   directory, ``/run/nixpush/<id>/``, and starts it detached: a transient systemd unit
   ``nixpush-switch-<id>`` where the target has systemd (output in its journal), else a
   ``setsid`` process (output in ``<run dir>/output``). Neither belongs to the session, so a
   dropped link, Ctrl-C or a killed controller cannot interrupt it.
2. The program holds the host's lock until it ends (its holder, id, start and controller, is
   written in the lock file, world-readable: the planner reads it with the links). It pins the
   previous and the new system as GC roots (``/nix/var/nix/gcroots/nixpush-<id>``, removed at
   its end) and is its own watchdog, armed before anything changes: it records what the target
   runs and boots, runs ``switch-to-configuration`` (bounded by ``activation_timeout``), then
   waits up to ``confirm_timeout`` seconds, measured on the time since boot (the wall clock
   steps), for a confirmation (``confirm_command``). With a rollback armed, ``switch``
   activates as ``test`` and only once confirmed sets the system profile and runs the new
   system's ``switch-to-configuration boot``: a reboot in the window comes back on the old
   system. Without a confirmation, on a rejection (``reject_command``) or when
   ``switch-to-configuration`` exits non-zero, it rolls back: the previous system's
   ``switch-to-configuration test``, and when it had set the profile, the profile back and only
   the generation this run created deleted, the previous boot default restored. Its state is in
   ``<run dir>/status``; ``follow_command`` reads it with the output.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.facts import FactBase

from operations.core.models import SYSTEM_PROFILE, Action, Plan, Safety
from operations.push.commands import SystemLinks, switch_command

RUN_ROOT = "/run/nixpush"
UNIT_PREFIX = "nixpush-switch-"
STATUS_MARK = "@@nixpush-status@@"
LAUNCHED_MARK = "@@nixpush-launched@@"
CONFIRMED_MARK = "@@nixpush-confirmed@@"
DRY_ACTIVATED_MARK = "@@nixpush-dry-activated@@"
PENDING_MARK = "@@nixpush-pending@@"
LOCK = f"{RUN_ROOT}/lock"
AWAITING = "awaiting-confirmation"
TERMINAL = ("confirmed", "done", "failed", "rolled-back", "rollback-failed", "missing")

# -- the program that runs on the target -----------------------------------------------

# The program (switch.sh beside this file, package data): POSIX sh, run as root.
PROGRAM = (resources.files("operations.push") / "switch.sh").read_text(encoding="utf-8")
PROGRAM_SHA256 = hashlib.sha256(PROGRAM.encode()).hexdigest()

# Waits up to $3 s for the host's lock to be free (another activation's program holds it until
# it ends), else prints PENDING_MARK and its holder and fails; then installs the program
# (stdin) in a new root-only run directory, checks it against its SHA-256 ($2: an upload cut
# short starts nothing), and execs the starter given as the remaining arguments, with no tie
# to the session's stdin/stdout. The lock file and its directory are world-readable: the
# planner reads the holder without sudo. Polled with `flock -n` (busybox's flock has no -w).
INSTALL = r"""set -e; umask 077; d=$1 sum=$2 wait=$3; shift 3
mkdir -p "${d%/*}"; chmod 0755 "${d%/*}"; l=${d%/*}/lock
[ -e "$l" ] || { : >> "$l"; chmod 0644 "$l"; }
command -v flock >/dev/null || { echo "nixpush: the target has no flock command"; exit 3; }
i=0
until flock -n "$l" true; do
  if [ "$i" -ge "$wait" ]; then echo "@@nixpush-pending@@"; cat "$l"; exit 3; fi
  sleep 1; i=$((i + 1))
done
mkdir -m 0700 "$d"; cat > "$d/program"
got=$(sha256sum < "$d/program")
if [ "${got%% *}" != "$sum" ]; then
  echo "nixpush: the program arrived cut short ($(wc -c < "$d/program") bytes): nothing started"
  rm -rf "$d"; exit 3
fi
exec "$@" </dev/null >>"$d/output" 2>&1"""

# States the program passes through on its own; every other one wants the controller (it
# confirms, or reports the outcome).
TRANSIENT = ("starting", "activating", "committing", "rolling-back")

# Answers once the state is another than $3 and not TRANSIENT, or after $4 s with what there
# is: the output lines after the first $2 (read after the state: the program writes its lines
# before the state they lead to), STATUS_MARK, the status and, once the run is over
# (TERMINAL), what the links point at. Polled five times a second: shell builtins and sleep,
# nothing else (a real Pi pays for every process while it activates).
FOLLOW = (
    r"""dir=$1 seen=$2 known=$3 wait=$4 unit=$5
state() {
  text= now=
  if [ -f "$dir/status" ]; then
    while IFS= read -r line; do
      text="$text$line
"
      case $line in state=*) now=${line#state=} ;; esac
    done < "$dir/status"
  elif [ -d "$dir" ]; then now=starting; else now=missing; fi
}
polls=0
while :; do
  state
  case $now in @TRANSIENT@) ;; *) [ "$now" != "$known" ] && break ;; esac
  [ "$polls" -ge $((wait * 5)) ] && break
  sleep 0.2; polls=$((polls + 1))
done
if [ -n "$unit" ]; then
  journalctl -q -u "$unit" -o cat --no-pager 2>/dev/null | sed -n "$((seen + 1)),\$p"
elif [ -f "$dir/output" ]; then
  n=0
  while IFS= read -r line; do
    n=$((n + 1))
    [ "$n" -gt "$seen" ] && printf '%s\n' "$line"
  done < "$dir/output"
fi
echo "@@nixpush-status@@"
if [ -n "$text" ]; then printf '%s' "$text"; else echo "state=$now"; fi
case $now in @TERMINAL@)
  echo "current=$(readlink -f /run/current-system 2>/dev/null)"
  echo "profile=$(readlink -f /nix/var/nix/profiles/system 2>/dev/null)" ;;
esac
"""
    .replace("@TRANSIENT@", "|".join(TRANSIENT))
    .replace("@TERMINAL@", "|".join(TERMINAL))
)  # fmt: skip

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
    f'l={LOCK}; if [ -s "$l" ]; then while IFS= read -r x; do echo "pending-$x"; '
    'case $x in pid=*) if [ -d "/proc/${x#pid=}" ]; then echo pending-alive=1; fi ;; esac; '
    'done < "$l"; fi'
)


class LinksAndPending(FactBase[tuple[str | None, str | None, str | None]]):
    """
    ``SystemLinks`` and the activation pending on the target (``pending_activation``), in one
    command: ``(current, profile, pending)``.
    """

    def command(self) -> StringCommand:
        return StringCommand(SystemLinks().command(), ";", PENDING_READ)

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
    """

    id: str
    action: str
    desired: str
    generation: int | None
    safety: Safety
    systemd: bool
    controller: str = ""

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
            controller=f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}",
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
        PROGRAM_SHA256, str(run.lock_wait), *starter,
    )  # fmt: skip


def launch_and_follow_command(run: ActivationRun, wait: int) -> StringCommand:
    """``launch_command``, then ``LAUNCHED_MARK`` and the first follow's answer (at the first
    state that wants the controller): one round trip. Without the mark the run did not start;
    with it, a command that failed lost its follow, not the run."""
    return then_follow(launch_command(run), LAUNCHED_MARK, run, 0, "", wait)


def dry_activate_and_launch_command(run: ActivationRun, wait: int) -> StringCommand:
    """``switch-to-configuration dry-activate`` of the new system (its report first, its stdin
    kept from the program's), then ``DRY_ACTIVATED_MARK`` and ``launch_and_follow_command``:
    nothing is launched unless the dry activation passed."""
    return StringCommand(
        switch_command(run.desired, "dry-activate"), "</dev/null && echo", DRY_ACTIVATED_MARK,
        "&&", launch_and_follow_command(run, wait),
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


def parse_follow(output: Sequence[str]) -> Progress:
    """Split a follow answer at its last STATUS_MARK."""
    lines = list(output)
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
