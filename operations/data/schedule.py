"""
The ``schedule`` data of a controller, checked once into a ``Schedule``: when ``nixpush-run``
runs and with what (``operations.builder.timers`` renders the units from it).

The data, checked once into a ``Schedule`` (``parse_schedule``), with the fix named on error:

.. code:: python

    schedule = {
        "enabled": True,
        "checkout": "/home/beau/nixpush",                  # WorkingDirectory
        "program": "/home/beau/nixpush/.venv/bin/nixpush-run",  # not needed on NixOS
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

``program`` is the ``nixpush-run`` a Debian host's units run; a NixOS host's units run
``python -m operations.run.runner`` of the fragment's Nix environment instead, so it may be
left out there (``deploys/schedule.py`` fails a host that is not NixOS without it).

Values go into unit files, which systemd parses: every value is checked (no control
characters, absolute paths, a user name, a calendar and a time span made of the characters
systemd uses) and ExecStart's arguments are quoted and escaped (``%`` and ``$``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api.exceptions import PyinfraError

from operations.core.files import ACCOUNT_NAME
from operations.core.lock import DEFAULT_STATE_DIR
from operations.core.unattended import DEFAULT_KEEP, DEFAULT_TIMEOUT, SCHEDULE

MODES: tuple[str, ...] = tuple(sorted(SCHEDULE))
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
    if not isinstance(value, str) or CONTROL.search(value) or not pattern.fullmatch(value):
        raise ScheduleError(f"{host_name}: schedule {key} = {value!r} is not {what}")
    return value


def _argument(host_name: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or CONTROL.search(value):
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
    # No program is fine at parse time: a NixOS host's units run nixpush from its Nix
    # environment; deploys/schedule.py fails a Debian host that lacks it, naming the key.
    if "checkout" not in data:
        raise ScheduleError(f"{host_name}: schedule has no checkout; set it ({path})")
    age_key = data.get("age_key_file")
    runs = _runs(host_name, data.get("runs") or {})
    state_dir = _normal_dir(
        host_name, "state_dir", data.get("state_dir", DEFAULT_STATE_DIR), "/var/lib/nixpush"
    )
    return Schedule(
        enabled=True,
        checkout=_text(host_name, "checkout", data["checkout"], _PATH, path),
        program=""
        if data.get("program") is None
        else _text(host_name, "program", data["program"], _PATH, path),
        user=_text(host_name, "user", data.get("user", "root"), ACCOUNT_NAME, "a user name"),
        age_key_file=None
        if age_key is None
        else _text(host_name, "age_key_file", age_key, _PATH, path),
        inventory=_argument(host_name, "inventory", data.get("inventory", "inventory.py")),
        state_dir=state_dir,
        keep=_count(host_name, "keep", data.get("keep", DEFAULT_KEEP), 1),
        wait=_count(host_name, "wait", data.get("wait", 0), 0),
        timeout=_count(host_name, "timeout", data.get("timeout", int(DEFAULT_TIMEOUT)), 1),
        runs=runs,
        activate=activate,
        **_alerting(host_name, data, state_dir),
    )


def _runs(host_name: str, runs_data: Any) -> tuple[Run, ...]:
    """The ``runs`` of a schedule: one ``Run`` per mode, sorted by mode."""
    if not isinstance(runs_data, Mapping) or not runs_data:
        raise ScheduleError(
            f"{host_name}: schedule runs must map a mode ({', '.join(MODES)}) to "
            "{'on_calendar': ..., 'randomized_delay': ...}"
        )
    return tuple(_run(host_name, mode, run) for mode, run in sorted(runs_data.items()))


def _run(host_name: str, mode: str, run: Any) -> Run:
    """One mode's run: its timer's calendar and delay, what it limits to and deploys."""
    if mode not in MODES or not isinstance(run, Mapping):
        raise ScheduleError(
            f"{host_name}: schedule runs has {mode!r}; modes are {', '.join(MODES)}, each "
            "a dict with on_calendar"
        )
    limit, deploys = run.get("limit", []), run.get("deploys", [])
    if not isinstance(limit, Sequence) or not isinstance(deploys, Sequence):
        raise ScheduleError(f"{host_name}: schedule runs {mode} limit and deploys are lists")
    return Run(
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
    )  # fmt: skip
