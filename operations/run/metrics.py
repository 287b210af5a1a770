"""
node_exporter textfile metrics for ``nixpush-run`` (``--metrics-dir``): one file per mode,
``<metrics-dir>/nixpush_<mode>.prom``, in the Prometheus text exposition format, replaced
atomically (a hidden temp file in the same directory, then a rename: node_exporter reads only
``*.prom``).

.. code:: text

    nixpush_run_exit_code{mode="check"} 2
    nixpush_host_status{host="pi4",mode="check",status="drifted"} 1
    nixpush_host_last_success_timestamp_seconds{host="pi4",mode="check"} 1.7350236e+09

A run rewrites its mode's file whole. The last success times are kept in the state directory
(``metrics-<mode>.json``), so a failed run, which has none of its own, still reports them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from operations.core.files import make_dirs, write_atomically
from operations.run.report import STATUS_ORDER, ExitCode

# node_exporter runs as its own user: the metrics are world-readable (they hold host names,
# statuses and store paths, never a secret or a cause text).
METRICS_MODE = 0o644
METRICS_DIR_MODE = 0o755
# A run or host that ended with one of these succeeded: nothing failed (drift is a finding).
RUN_SUCCESS = (ExitCode.OK, ExitCode.DRIFT)
HOST_SUCCESS = ("unchanged", "changed", "drifted")

# name -> (help text); every one is a gauge.
HELP = {
    "nixpush_run_exit_code": "Exit code of the last run (0 ok, 1 failed, 2 drift, 64 usage).",
    "nixpush_run_start_timestamp_seconds": "When the last nixpush-run started (Unix time).",
    "nixpush_run_duration_seconds": "How long the last nixpush-run took.",
    "nixpush_run_last_success_timestamp_seconds": (
        "When the last nixpush-run in which nothing failed started (Unix time)."
    ),
    "nixpush_host_status": "1 for the host's status in the last run, 0 for the others.",
    "nixpush_host_last_success_timestamp_seconds": (
        "When the last run in which the host was unchanged, changed or drifted started."
    ),
    "nixpush_host_duration_seconds": (
        "Wall time of the last run's deploys that included the host (hosts run in parallel)."
    ),
    "nixpush_host_drift": "1 when the host differs from what the flake and data say.",
    "nixpush_host_revision_info": (
        "1, labelled with the flake revision (or narHash) of the host's system this run."
    ),
    "nixpush_host_generation_info": "The system the host runs after the last run (label path).",
    "nixpush_host_reboot_required": (
        "1 when the host's new system needs a reboot to be fully in effect (kernel, initrd, "
        "modules or kernel parameters differ from the booted system's)."
    ),
}


@dataclass(frozen=True)
class LastSuccess:
    """
    When a mode's run, and each host in it, last succeeded (Unix time), kept between runs.

    + run: the newest run that succeeded (``RUN_SUCCESS``), None if none did yet
    + hosts: host -> the newest run in which the host succeeded (``HOST_SUCCESS``)
    """

    run: float | None = None
    hosts: Mapping[str, float] = field(default_factory=dict)

    def updated(self, report: Mapping[str, Any]) -> LastSuccess:
        """These times with the run of ``report`` counted in."""
        started = _timestamp(report)
        hosts = dict(self.hosts)
        for name, entry in report["hosts"].items():
            if entry["status"] in HOST_SUCCESS:
                hosts[name] = started
        run = started if report["exit_code"] in RUN_SUCCESS else self.run
        return LastSuccess(run, hosts)

    def as_json(self) -> dict[str, Any]:
        return {"run": self.run, "hosts": dict(sorted(self.hosts.items()))}


def state_path(state_dir: Path, mode: str) -> Path:
    """``<state-dir>/metrics-check.json``: a mode's ``LastSuccess``."""
    return state_dir / f"metrics-{mode}.json"


def metrics_path(metrics_dir: Path, mode: str) -> Path:
    """``<metrics-dir>/nixpush_check.prom``."""
    return metrics_dir / f"nixpush_{mode}.prom"


def load_last_success(path: Path) -> LastSuccess:
    """The times kept at ``path``; none when it is missing or unreadable (a new state dir)."""
    try:
        data = json.loads(path.read_text())
        run = data.get("run")
        hosts = {str(k): float(v) for k, v in (data.get("hosts") or {}).items()}
        return LastSuccess(None if run is None else float(run), hosts)
    except (OSError, ValueError, TypeError, AttributeError):
        return LastSuccess()


def _timestamp(report: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(report["started"])).timestamp()


def _label_value(value: str) -> str:
    # The exposition format's escapes in a label value: backslash, double quote, newline.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    text = ",".join(f'{key}="{_label_value(val)}"' for key, val in sorted(labels.items()))
    number = repr(float(value)) if math.isfinite(value) else "NaN"
    return f"{name}{{{text}}} {number}"


def _host_durations(report: Mapping[str, Any]) -> dict[str, float]:
    durations: dict[str, float] = {}
    for deploy in report["deploys"]:
        for name in deploy["hosts"]:
            durations[name] = durations.get(name, 0.0) + float(deploy["duration_s"])
    return durations


def render(report: Mapping[str, Any], last: LastSuccess) -> str:
    """
    The metrics of one run (``report``, as ``nixpush-run`` writes it) in the text format, the
    success times from ``last`` (which already counts this run: ``LastSuccess.updated``).
    """
    mode = str(report["mode"])
    run = {"mode": mode}
    samples: dict[str, list[str]] = {name: [] for name in HELP}

    def add(name: str, labels: Mapping[str, str], value: float) -> None:
        samples[name].append(_sample(name, labels, value))

    add("nixpush_run_exit_code", run, report["exit_code"])
    add("nixpush_run_start_timestamp_seconds", run, _timestamp(report))
    add("nixpush_run_duration_seconds", run, float(report["duration_s"]))
    if last.run is not None:
        add("nixpush_run_last_success_timestamp_seconds", run, last.run)
    durations = _host_durations(report)
    for host_name, entry in report["hosts"].items():
        labels = {"mode": mode, "host": host_name}
        for status in STATUS_ORDER:
            value = 1.0 if entry["status"] == status else 0.0
            add("nixpush_host_status", {**labels, "status": status}, value)
        if host_name in last.hosts:
            add("nixpush_host_last_success_timestamp_seconds", labels, last.hosts[host_name])
        if host_name in durations:
            add("nixpush_host_duration_seconds", labels, durations[host_name])
        add("nixpush_host_drift", labels, 1.0 if entry["status"] == "drifted" else 0.0)
        if "reboot_required" in entry:
            add("nixpush_host_reboot_required", labels, 1.0 if entry["reboot_required"] else 0.0)
        if entry.get("revision"):
            revision = {**labels, "revision": str(entry["revision"])}
            add("nixpush_host_revision_info", revision, 1.0)
        running = (entry.get("after") or {}).get("current")
        if running:
            add("nixpush_host_generation_info", {**labels, "path": str(running)}, 1.0)
    lines: list[str] = []
    for name, help_text in HELP.items():
        if samples[name]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *samples[name]]
    return "\n".join(lines) + "\n"


class TimesNotKept(OSError):
    """The metrics file was written, but the success times could not be kept in the state
    directory (a full disk): the next run reports the older ones."""


def write_metrics(
    metrics_dir: Path, state_dir: Path, report: Mapping[str, Any]
) -> tuple[Path, LastSuccess]:
    """Count ``report``'s run in the kept success times, write its mode's metrics file, then
    keep the times; the file's path and the times. ``OSError`` when the metrics file cannot be
    written, ``TimesNotKept`` (after it was) when the times cannot: a full state directory
    must not hide the run that found it from the monitor."""
    mode = str(report["mode"])
    kept = state_path(state_dir, mode)
    last = load_last_success(kept).updated(report)
    make_dirs(metrics_dir, METRICS_DIR_MODE)
    path = metrics_path(metrics_dir, mode)
    write_atomically(path, render(report, last), METRICS_MODE)
    try:
        write_atomically(kept, json.dumps(last.as_json(), indent=2) + "\n", 0o640)
    except OSError as error:
        raise TimesNotKept(f"the success times were not kept in {kept}: {error}") from error
    return path, last
