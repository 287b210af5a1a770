"""
Safe switching: activation that survives a dropped session, confirmed over a new SSH login,
rolled back by the target itself when that confirmation does not come.

How one activation goes (``activate_safely``):

1. The controller uploads ``PROGRAM`` (on stdin) into a root-only run directory on the target,
   ``/run/nixpush/<id>/``, and starts it detached from the SSH session: a transient systemd
   unit ``nixpush-switch-<id>`` where the target has systemd (output in its journal), else a
   ``setsid`` process (output in ``<run dir>/output``). Neither belongs to the session, so a
   dropped link, Ctrl-C or a killed controller cannot interrupt it.
2. The program is its own watchdog, armed before anything changes: it records what the target
   runs and boots, sets the system profile (``switch``/``boot``), runs
   ``switch-to-configuration`` (bounded by ``activation_timeout``), then waits up to
   ``confirm_timeout`` seconds for a confirmation. Without one, or when
   ``switch-to-configuration`` exits non-zero, it rolls back: profile to the previous generation
   (the new one deleted), the previous system's ``switch-to-configuration`` (``switch``; ``test``
   for a test), which restores the boot default too. Its state is in ``<run dir>/status``.
3. Meanwhile the controller follows the output and the state (``follow_command``); when the
   connection drops it reconnects with fresh ``ssh`` processes until the outcome is known.
4. Once the program awaits confirmation, the controller runs the host's health checks
   (``operations.health``), then confirms over a *new* SSH connection (a fresh ``ssh`` process,
   no multiplexing, the host's own address, port, user, key and known hosts): that a new login
   works is part of what is confirmed. A failed check rejects at once (no waiting).
5. The outcome: ``deployed``, ``rolled-back: <cause>`` (the host is verified to run its
   previous system again) or ``failed`` (with the cause and what the host runs now).

``boot`` gets no automatic rollback: nothing can be confirmed without a reboot.
``deploy_action=rollback`` (``plan_rollback``) goes back to the previous generation, the same way.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Directory

from operations.fleet import FleetError
from operations.health import HealthCheck, run_checks
from operations.nixos import CURRENT_SYSTEM, SYSTEM_PROFILE, DeployFailed, Plan, StorePathLink
from operations.process import run_local
from operations.summary import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

    from operations.fleet import HostSpec

RUN_ROOT = "/run/nixpush"
UNIT_PREFIX = "nixpush-switch-"
SYSTEMD_MARKER = "/run/systemd/system"
# Actions this module activates; "rollback" is deploy_action=rollback (a switch to the
# previous generation).
SAFE_ACTIONS = ("switch", "boot", "test", "rollback")
DEFAULT_CONFIRM_TIMEOUT = 30
DEFAULT_ACTIVATION_TIMEOUT = 600
# How long one follow command waits on the target for news, and a fresh ssh for a connection.
FOLLOW_WAIT = 5
CONNECT_TIMEOUT = 5
# Beyond activation + confirmation (+ a rollback's own activation), how long the controller
# keeps trying to learn the outcome after losing contact.
GRACE = 60
CONFIRM_ATTEMPTS = 3
STATUS_MARK = "@@nixpush-status@@"
TERMINAL = ("confirmed", "done", "failed", "rolled-back", "rollback-failed", "missing")

# -- the program that runs on the target -----------------------------------------------

# POSIX sh, run as root, every value positional: dir action new generation rollback
# confirm_timeout activation_timeout. `generation` (a number) switches the profile to an
# existing generation (deploy_action=rollback) instead of adding one for `new`.
PROGRAM = r"""# nixpush activation (operations/activation.py), detached from the SSH session.
dir=$1 action=$2 new=$3 generation=$4 rollback=$5 confirm_timeout=$6 activation_timeout=$7
profile=/nix/var/nix/profiles/system
PATH=$PATH:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
cd /
status() {
  { echo "state=$1"; shift; for line in "$@"; do echo "$line"; done; } > "$dir/status.new"
  mv -f "$dir/status.new" "$dir/status"
}
generation_of() { g=${1#system-}; echo "${g%-link}"; }
prev_current=$(readlink -f /run/current-system 2>/dev/null)
prev_profile=$(readlink -f "$profile" 2>/dev/null)
prev_gen=$(generation_of "$(readlink "$profile" 2>/dev/null)")
new_gen=
status activating
echo "nixpush: $action $new (was ${prev_current:-nothing})"
stc() { timeout "$activation_timeout" "$1/bin/switch-to-configuration" "$2"; }
roll_back() {
  status rolling-back "cause=$1"
  echo "nixpush: rolling back: $1"
  ok=1
  if [ "$action" != test ]; then
    if [ -n "$prev_gen" ]; then
      nix-env -p "$profile" --switch-generation "$prev_gen" || ok=0
      if [ -z "$generation" ] && [ -n "$new_gen" ] && [ "$new_gen" != "$prev_gen" ]; then
        nix-env -p "$profile" --delete-generations "$new_gen" || ok=0
      fi
    else
      echo "nixpush: no previous generation of $profile"; ok=0
    fi
  fi
  if [ -n "$prev_current" ] && [ -x "$prev_current/bin/switch-to-configuration" ]; then
    if [ "$action" = test ] || [ "$prev_current" != "$prev_profile" ]; then
      stc "$prev_current" test || ok=0
      if [ "$action" != test ] && [ -x "$prev_profile/bin/switch-to-configuration" ]; then
        stc "$prev_profile" boot || ok=0
      fi
    else
      stc "$prev_current" switch || ok=0
    fi
  else
    echo "nixpush: no previous system to activate"; ok=0
  fi
  now=$(readlink -f /run/current-system 2>/dev/null)
  if [ "$ok" = 1 ] && [ "$now" = "$prev_current" ]; then
    status rolled-back "cause=$1"
  else
    status rollback-failed "cause=$1"
  fi
  echo "nixpush: now running ${now:-nothing}"
  exit 0
}
case $action in
  switch|boot)
    if [ -n "$generation" ]; then
      nix-env -p "$profile" --switch-generation "$generation"
    else
      nix-env -p "$profile" --set "$new"
    fi
    rc=$?
    if [ "$rc" != 0 ]; then
      status failed "cause=setting the system profile failed (nix-env exited $rc)"
      exit 0
    fi
    new_gen=$(generation_of "$(readlink "$profile" 2>/dev/null)")
    ;;
esac
stc "$new" "$action"
rc=$?
if [ "$rc" != 0 ]; then
  why="switch-to-configuration $action exited $rc"
  [ "$rc" = 124 ] && why="switch-to-configuration $action timed out after ${activation_timeout}s"
  [ "$rollback" = 1 ] && roll_back "$why"
  status failed "cause=$why"
  exit 0
fi
if [ "$rollback" != 1 ]; then
  status done
  exit 0
fi
: > "$dir/awaiting"
status awaiting-confirmation "timeout=$confirm_timeout"
echo "nixpush: activated; rolling back unless confirmed within ${confirm_timeout}s"
deadline=$(( $(date +%s) + confirm_timeout ))
while [ -e "$dir/awaiting" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
if mv "$dir/awaiting" "$dir/expired" 2>/dev/null; then
  roll_back "no confirmation within ${confirm_timeout}s"
fi
if [ -e "$dir/confirmed" ]; then
  status confirmed
  echo "nixpush: confirmed"
  exit 0
fi
roll_back "$(cat "$dir/reject-cause" 2>/dev/null || echo rejected)"
"""

# Installs the program (stdin) in a new root-only run directory, then execs the starter given
# as the remaining arguments, with no tie to the session's stdin/stdout.
INSTALL = (
    'set -e; umask 077; mkdir -p -m 0700 "${1%/*}"; mkdir -m 0700 "$1"; '
    'cat > "$1/program"; d=$1; shift; exec "$@" </dev/null >>"$d/output" 2>&1'
)

# Prints the output lines after the first $2 (waiting up to $4 s for news: more lines or a
# state other than $3), then STATUS_MARK, the status and what the links point at now.
FOLLOW = r"""dir=$1 seen=$2 known=$3 wait=$4 unit=$5
out() {
  if [ -n "$unit" ]; then journalctl -q -u "$unit" -o cat --no-pager 2>/dev/null
  else cat "$dir/output" 2>/dev/null; fi
}
state() {
  if [ -f "$dir/status" ]; then sed -n 's/^state=//p' "$dir/status"
  elif [ -d "$dir" ]; then echo starting; else echo missing; fi
}
deadline=$(( $(date +%s) + wait ))
while :; do
  total=$(( $(out | wc -l) ))
  now=$(state)
  if [ "$total" -gt "$seen" ] || [ "$now" != "$known" ] || [ "$(date +%s)" -ge "$deadline" ]; then
    break
  fi
  sleep 0.2
done
# New lines while the state holds: gather a little more, to spare round trips.
if [ "$now" = "$known" ] && [ "$total" -gt "$seen" ]; then
  sleep 0.3; total=$(( $(out | wc -l) )); now=$(state)
fi
if [ "$total" -gt "$seen" ]; then out | sed -n "$((seen + 1)),${total}p"; fi
echo "@@nixpush-status@@"
if [ -f "$dir/status" ]; then cat "$dir/status"; else echo "state=$now"; fi
echo "current=$(readlink -f /run/current-system 2>/dev/null)"
echo "profile=$(readlink -f /nix/var/nix/profiles/system 2>/dev/null)"
"""

# The confirmation and the rejection race the program's own timeout for one rename: exactly
# one of confirmed, rejected, expired wins.
CONFIRM = 'mv "$1/awaiting" "$1/confirmed"'
REJECT = 'printf "%s\\n" "$2" > "$1/reject-cause" && mv "$1/awaiting" "$1/rejected"'


# -- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Safety:
    """
    How an activation is guarded.

    + rollback: the target rolls back unless confirmed (never for ``boot``)
    + confirm_timeout: seconds the target waits for the confirmation after activating
    + activation_timeout: seconds ``switch-to-configuration`` may take
    """

    rollback: bool = True
    confirm_timeout: int = DEFAULT_CONFIRM_TIMEOUT
    activation_timeout: int = DEFAULT_ACTIVATION_TIMEOUT


def _seconds(host: Host, key: str, default: int, problems: list[str]) -> int:
    value = host.data.get(key, default)
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 86400:
        problems.append(f"{host.name}: {key} is {value!r}; set it to seconds, from 1 to 86400")
        return default
    return value


def safety_for(host: Host, action: str) -> Safety:
    """
    The host's ``rollback``, ``confirm_timeout`` and ``activation_timeout`` data for ``action``;
    rollback is off for ``boot``. Raises ``FleetError`` naming the key and the fix.
    """
    problems: list[str] = []
    rollback = host.data.get("rollback", True)
    if isinstance(rollback, str) and rollback.lower() in ("true", "false"):
        rollback = rollback.lower() == "true"
    if not isinstance(rollback, bool):
        problems.append(f"{host.name}: rollback is {rollback!r}; set it to True or False")
        rollback = True
    safety = Safety(
        rollback=rollback and action != "boot",
        confirm_timeout=_seconds(host, "confirm_timeout", DEFAULT_CONFIRM_TIMEOUT, problems),
        activation_timeout=_seconds(
            host, "activation_timeout", DEFAULT_ACTIVATION_TIMEOUT, problems
        ),
    )
    if problems:
        raise FleetError(problems)
    return safety


def describe(plan: Plan, safety: Safety, checks: Sequence[HealthCheck]) -> list[str]:
    """What the activation will do to stay safe, for the plan's log (``--dry`` shows it)."""
    if plan.up_to_date or plan.action not in SAFE_ACTIONS:
        return []
    if safety.rollback:
        guard = (
            f"rollback armed: the target rolls back unless confirmed within "
            f"{safety.confirm_timeout}s over a new SSH login"
        )
    elif plan.action == "boot":
        guard = "no automatic rollback for boot (nothing can be confirmed without a reboot)"
    else:
        guard = "rollback off (rollback: False): a failure leaves the new system in place"
    lines = [f"{guard}; activation timeout {safety.activation_timeout}s"]
    if checks:
        lines += [f"health check {check.description}" for check in checks]
    else:
        lines.append("no health checks (health_checks)")
    return lines


def announce(target: Host, plan: Plan, safety: Safety, checks: Sequence[HealthCheck]) -> None:
    """Log ``describe``'s lines for the target (deploy code, prepare time: ``--dry`` shows them)."""
    for line in describe(plan, safety, checks):
        target.log_styled(line, log_func=logger.info)


# -- facts -----------------------------------------------------------------------------


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
                current = _generation_number(parts[1])
            elif len(parts) == 2:
                number = _generation_number(parts[0].rsplit("/", 1)[-1])
                if number is not None:
                    paths[number] = parts[1]
        return {"current": current, "paths": paths}


def _generation_number(link: str) -> int | None:
    """``_generation_number("system-12-link") == 12``."""
    middle = link.removeprefix("system-").removesuffix("-link")
    return int(middle) if middle.isdecimal() else None


def plan_rollback(target: Host, spec: HostSpec) -> Plan:
    """
    The plan for ``deploy_action=rollback``: switch to the generation before the current one.
    Raises ``DeployFailed`` when there is none.
    """
    generations = target.get_fact(SystemGenerations)
    current = generations["current"]
    older = sorted(n for n in generations["paths"] if current is not None and n < current)
    if current is None or not older:
        raise DeployFailed(
            f"{spec.name} has no system generation before "
            f"{'its current one' if current is not None else 'none'} to roll back to"
        )
    plan = Plan(
        target=spec.name,
        builder=spec.builder_host or "",
        attr=f"{SYSTEM_PROFILE}-{older[-1]}-link",
        desired=generations["paths"][older[-1]],
        current=target.get_fact(StorePathLink, path=CURRENT_SYSTEM),
        profile=target.get_fact(StorePathLink, path=SYSTEM_PROFILE),
        action="rollback",
        built=True,
    )
    summary_for(target.state).planned(plan)
    target.log_styled(
        f"rollback: {plan.current or 'no system'} -> generation {older[-1]}, {plan.desired}",
        log_func=logger.info,
    )
    return plan


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
    """

    id: str
    action: str
    desired: str
    generation: int | None
    safety: Safety
    systemd: bool

    @classmethod
    def create(cls, plan: Plan, safety: Safety, systemd: bool) -> ActivationRun:
        generation = None
        if plan.action == "rollback":
            generation = _generation_number(plan.attr.rsplit("/", 1)[-1])
        return cls(
            id=f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}",
            action="switch" if plan.action == "rollback" else plan.action,
            desired=plan.desired,
            generation=generation,
            safety=safety,
            systemd=systemd,
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
    """Install PROGRAM (given on stdin) into the run directory and start it detached."""
    starter = systemd_starter(run) if run.systemd else setsid_starter(run)
    return StringCommand(
        "sh", "-c", QuoteString(INSTALL), "nixpush-launch", QuoteString(run.dir), *starter
    )


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


# -- reaching the target ---------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """How a fresh ``ssh`` from the controller reaches a host: its own pyinfra ssh data."""

    hostname: str
    port: int | None = None
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    strict: str = "accept-new"
    config_file: str | None = None

    @classmethod
    def of(cls, target: Host) -> SshTarget:
        data = target.data
        strict = str(data.get("ssh_strict_host_key_checking") or "accept-new")
        if strict not in ("yes", "no", "accept-new", "ask", "off"):
            strict = "yes"
        port = data.get("ssh_port")
        return cls(
            hostname=str(data.get("ssh_hostname") or target.name),
            port=int(port) if port else None,
            user=data.get("ssh_user") or None,
            key=data.get("ssh_key") or None,
            known_hosts=data.get("ssh_known_hosts_file") or None,
            strict=strict,
            config_file=data.get("ssh_config_file") or None,
        )


def ssh_argv(target: SshTarget, remote: StringCommand, *, sudo: bool) -> list[str]:
    """
    A fresh ``ssh`` running ``remote`` on ``target``: no multiplexing (a new login is what is
    being proven), batch mode, bounded connect and keep-alive times.
    """
    args = [
        "ssh",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", "ServerAliveInterval=2",
        "-o", "ServerAliveCountMax=3",
        "-o", f"StrictHostKeyChecking={target.strict}",
    ]  # fmt: skip
    if target.config_file:
        args += ["-F", target.config_file]
    if target.port:
        args += ["-p", str(target.port)]
    if target.user:
        args += ["-l", target.user]
    if target.key:
        args += ["-i", target.key, "-o", "IdentitiesOnly=yes"]
    if target.known_hosts:
        args += ["-o", f"UserKnownHostsFile={target.known_hosts}"]
    # ssh hands the remote command to the login shell as one string: quoted here, once.
    command = remote.get_raw_value()
    if sudo:
        command = f"sudo -n sh -c {shlex.quote(command)}"
    return [*args, "--", target.hostname, command]


@dataclass
class Channel:
    """
    Runs commands on the target: over pyinfra's connection while it works, then (after it
    failed once: a cut link makes it unreliable) with a fresh ``ssh`` process each time.
    ``run`` returns None when the target could not be reached.
    """

    host: Host
    sudo: bool
    ssh: SshTarget
    fresh: bool = False
    notes: list[str] = field(default_factory=list)

    def run(
        self, command: StringCommand, timeout: float, stdin: str | None = None
    ) -> tuple[bool, list[str]] | None:
        if not self.fresh:
            kwargs: dict[str, Any] = {"_sudo": self.sudo, "_timeout": timeout}
            if stdin is not None:
                kwargs["_stdin"] = stdin
            try:
                with gevent.Timeout(timeout + 5):
                    ok, output = self.host.run_shell_command(command, **kwargs)
                return ok, output.output_lines
            except (Exception, gevent.Timeout) as error:  # paramiko, socket, timeout: all "lost"
                self.fresh = True
                self.notes.append(f"{type(error).__name__}: {error}".strip(": "))
                return None
        return fresh_run(self.ssh, command, sudo=self.sudo, timeout=timeout, stdin=stdin)


def fresh_run(
    target: SshTarget,
    command: StringCommand,
    *,
    sudo: bool,
    timeout: float,
    stdin: str | None = None,
) -> tuple[bool, list[str]] | None:
    """``command`` over a new SSH connection: (success, output lines), None when ssh failed."""
    try:
        result = run_local(
            ssh_argv(target, command, sudo=sudo), input=stdin, timeout=timeout + CONNECT_TIMEOUT
        )
    except Exception:  # subprocess.TimeoutExpired, OSError
        return None
    lines = (result.stdout + result.stderr).splitlines()
    if result.returncode == 255:  # ssh's own failure: no connection, refused login
        return None if not lines else _ssh_failure(lines)
    return result.returncode == 0, lines


def _ssh_failure(lines: list[str]) -> tuple[bool, list[str]] | None:
    # A refused login is an answer (the target is up, logins fail); a timeout is not.
    text = " ".join(lines)
    if "Permission denied" in text or "Host key verification failed" in text:
        return False, lines
    return None


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


@dataclass(frozen=True)
class Outcome:
    """``deployed``, ``rolled-back`` or ``failed``, and why."""

    status: str
    cause: str = ""


def judge(plan: Plan, status: dict[str, str], note: str = "") -> Outcome:
    """
    The outcome of a finished run from its last status (with the links read by the follow
    command) and the controller's own reason for not confirming (``note``).
    """
    state = status.get("state", "")
    current, profile = status.get("current") or None, status.get("profile") or None
    cause = status.get("cause", "")
    runs = f"it now runs {current or 'nothing'}"
    action = "switch" if plan.action == "rollback" else plan.action
    if state in ("confirmed", "done"):
        if action in ("switch", "test") and current != plan.desired:
            return Outcome("failed", f"after {action}, /run/current-system is {current}")
        if action in ("switch", "boot") and profile != plan.desired:
            return Outcome("failed", f"after {action}, the system profile is {profile}")
        return Outcome("deployed")
    if state == "rolled-back":
        if note and cause.startswith("no confirmation"):
            cause = f"{cause} ({note})"
        if current != plan.current or (action == "switch" and profile != plan.profile):
            return Outcome("failed", f"rolled back after {cause}, but {runs}")
        return Outcome("rolled-back", cause)
    if state == "rollback-failed":
        return Outcome("failed", f"rolling back after {cause} failed; {runs}")
    if state == "failed":
        kept = " (rollback is off: the new system stays)" if current == plan.desired else ""
        return Outcome("failed", f"{cause}{kept}; {runs}")
    if state == "missing":
        return Outcome("failed", "the activation did not start on the target")
    return Outcome("failed", f"activation outcome unknown (last state: {state or 'none'})")


# -- the operation ---------------------------------------------------------------------


@operation(is_idempotent=False)
def activate_safely(
    plan: Plan,
    safety: Safety,
    checks: list[HealthCheck],
    sudo: bool,
) -> Generator[PyinfraCommand, None, None]:
    """
    Activate the plan's system detached from the SSH session, with health checks, a
    confirmation over a new SSH login and the target's own rollback (see the module's doc).

    + plan: the target's ``Plan`` (``switch``, ``boot``, ``test`` or ``rollback``)
    + safety: ``safety_for(host, plan.action)``
    + checks: ``operations.health.host_health_checks(host)``
    + sudo: run with sudo (a non-root deploy user)

    **Example:**

    .. code:: python

        activation.activate_safely(plan=plan, safety=safety_for(host, plan.action),
                                   checks=host_health_checks(host), sudo=True)
    """
    if plan.up_to_date or plan.action not in SAFE_ACTIONS:
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: no activation")
        return
    systemd = bool(host.get_fact(Directory, path=SYSTEMD_MARKER))
    yield FunctionCommand(_activate, (plan, safety, checks, sudo, systemd), {})


def _activate(
    state: State,
    host: Host,
    plan: Plan,
    safety: Safety,
    checks: list[HealthCheck],
    sudo: bool,
    systemd: bool,
) -> bool:
    try:
        outcome = _follow_activation(host, plan, safety, checks, sudo, systemd)
    except Exception as error:  # never a traceback out of a deploy
        outcome = Outcome("failed", f"activation broke off: {type(error).__name__}: {error}")
    summary = summary_for(state)
    if outcome.status == "deployed":
        verb = "boots" if plan.action == "boot" else "runs"
        host.log_styled(f"{plan.target} now {verb} {plan.desired}", log_func=logger.info)
        return True
    if outcome.status == "rolled-back":
        host.log_styled(f"rolled back: {outcome.cause}", fg="yellow", log_func=logger.error)
        summary.rolled_back(host.name, outcome.cause)
        return False
    host.log_styled(f"failed: {outcome.cause}", fg="red", log_func=logger.error)
    summary.fail(host.name, outcome.cause)
    return False


def _follow_activation(
    host: Host,
    plan: Plan,
    safety: Safety,
    checks: list[HealthCheck],
    sudo: bool,
    systemd: bool,
) -> Outcome:
    run = ActivationRun.create(plan, safety, systemd)
    channel = Channel(host, sudo, SshTarget.of(host))

    def say(text: str, **style: Any) -> None:
        host.log_styled(text, log_func=logger.info, **style)

    how = f"systemd unit {run.unit}" if systemd else f"setsid, output in {run.dir}/output"
    say(f"activating detached from this session ({how})")
    launched = channel.run(launch_command(run), timeout=60, stdin=PROGRAM)
    if launched is not None and not launched[0]:
        detail = next((x.strip() for x in reversed(launched[1]) if x.strip()), "no output")
        return Outcome("failed", f"could not start the activation: {detail}")

    budget = 2 * safety.activation_timeout + safety.confirm_timeout + GRACE
    deadline = time.monotonic() + budget
    seen, known, note = 0, "", ""
    status: dict[str, str] = {}
    confirming_done = False
    lost_at: float | None = None
    while True:
        if time.monotonic() > deadline:
            last = known or "unknown"
            return Outcome(
                "failed",
                f"lost contact for good (last state {last}); the target rolls itself back "
                "unless it was confirmed: check it once it is reachable",
            )
        answer = channel.run(follow_command(run, seen, known, FOLLOW_WAIT), FOLLOW_WAIT + 5)
        if answer is None or not answer[0]:
            if lost_at is None:
                lost_at = time.monotonic()
                say(
                    "lost contact; the activation carries on on the target "
                    f"({'it rolls back unless confirmed' if run.rolls_back else 'no rollback'})"
                    "; reconnecting",
                    fg="yellow",
                )
            gevent.sleep(1)
            continue
        if lost_at is not None:
            say(f"reconnected after {time.monotonic() - lost_at:.1f}s")
            lost_at = None
        progress = parse_follow(answer[1])
        for line in progress.lines:
            say(f"activate: {line}")
        seen += len(progress.lines)
        status, known = progress.status or status, progress.state
        if known == "awaiting-confirmation" and not confirming_done:
            confirming_done = True
            note = _check_and_confirm(channel, run, checks, systemd, say) or ""
        if known in TERMINAL:
            break
    if known == "done" and not run.rolls_back and plan.action != "boot":
        failed = run_checks(
            checks, systemd=systemd, run=lambda c, t: channel.run(c, t), log=lambda m: say(m)
        )
        if failed:
            return Outcome("failed", f"{failed} (rollback is off: it stays on {plan.desired})")
    return judge(plan, status, note)


def _check_and_confirm(
    channel: Channel,
    run: ActivationRun,
    checks: list[HealthCheck],
    systemd: bool,
    say: Any,
) -> str | None:
    """Health checks, then the confirmation over a new login; the reason when not confirmed."""
    started = time.monotonic()
    problem = run_checks(
        checks, systemd=systemd, run=lambda c, t: channel.run(c, t), log=lambda m: say(m)
    )
    if problem is None:
        last = "no answer"
        for attempt in range(CONFIRM_ATTEMPTS):
            if time.monotonic() - started > run.safety.confirm_timeout:
                break
            if attempt:
                gevent.sleep(1)
            result = fresh_run(channel.ssh, confirm_command(run), sudo=channel.sudo, timeout=20)
            if result is not None and result[0]:
                say("confirmed over a new SSH connection")
                return None
            if result is None:
                last = "the new SSH connection timed out or was refused"
            else:
                text = [x.strip() for x in result[1] if x.strip()]
                last = text[-1] if text else "the confirmation was refused"
                if "No such file" in " ".join(text):
                    return "the confirmation came too late"
        problem = f"a new SSH login to confirm failed: {last}"
    say(f"not confirming: {problem}", fg="yellow")
    rejected = channel.run(reject_command(run, problem), 20)
    if rejected is None or not rejected[0]:
        say("could not tell the target; it rolls back when its confirmation time is up")
    return problem
