"""
The record of one unattended run (``nixpush-run``): per-host outcomes gathered from each deploy,
the exit code a monitor acts on, a short human summary, and the report files on disk.

Pure functions over plain data, so each piece is unit tested without pyinfra:

- ``host_outcomes`` reads one deploy's results: the run summary nixpush's deploys write
  (``NIXPUSH_REPORT_FILE``, see ``operations.core.summary``) and pyinfra's own ``--json`` output
  (which hosts an operation would change, did change or failed on);
- ``merge_hosts`` folds the deploys of a run into one status per host;
- ``exit_code`` maps a run to ``ExitCode``;
- ``write_report`` writes ``<reports>/<UTC stamp>-<mode>.json`` and ``latest.json`` atomically
  and ``prune_reports`` keeps the newest N.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from operations.core.files import make_dirs, write_atomically
from operations.core.lock import STATE_DIR_MODE
from operations.core.models import ACTIONS, Action

REPORT_VERSION = 1
# Group readable (a monitor in the state dir's group), nobody else: reports and their logs.
REPORT_MODE = 0o640
LATEST = "latest.json"
# <YYYYmmddTHHMMSS.ffffffZ>-<mode>.json: sorts by time as text.
_REPORT_NAME = re.compile(r"^\d{8}T\d{6}(\.\d+)?Z-[a-z]+\.json$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# pyinfra logs a failed connection as "[pi4]<padding> <reason>", the reason starting with one
# of its connectors' phrases (connectors/ssh.py): timeout, refused, unreachable network, unknown
# name, authentication, host key. While it connects ("--> Connecting to hosts..."), any such
# line but "Connected" is one; later (a builder connected at prepare time) only these phrases.
_HOST_LINE = re.compile(r"^\s*\[(?P<host>[^\]]+)\]\s+(?P<said>\S.*)$")
_CONNECT_REASONS = (
    "Could not connect",
    "Could not resolve hostname",
    "SSH error",
    "SSH host key error",
    "EOF error",
    "Authentication error",
    "Unable to establish SFTP connection",
    "Unsupported file transfer protocol",
)
_CONNECTING = "--> Connecting to hosts"
# What a failed host's cause starts with when pyinfra could not connect to it.
COULD_NOT_CONNECT = "could not connect"
# pyinfra's last words when every host failed (to connect, or later): no deploy code ran.
NO_HOSTS_REMAINING = "No hosts remaining!"
# An offline_ok host that could not be reached: the run summary's own words.
OFFLINE = "unreachable, and offline_ok: not deployed this run"

# Worst first: a host's status over several deploys is the worst of them.
STATUS_ORDER = (
    "failed",
    "rolled-back",
    "held",
    "drifted",
    "changed",
    "unchanged",
    "offline",
    "skipped",
)


class ExitCode(IntEnum):
    """``nixpush-run``'s exit codes (also in ``--help`` and the README)."""

    OK = 0  # check: no drift; deploy: every host deployed or already up to date
    FAILED = 1  # a host failed or a deploy errored
    DRIFT = 2  # check only: some host differs from what the flake and data say; none failed
    USAGE = 64  # EX_USAGE: bad arguments, or a --limit that matches no host
    LOCKED = 75  # EX_TEMPFAIL: another run holds the lock (after --wait seconds)


@dataclass(frozen=True)
class HostOutcome:
    """
    One host in one deploy.

    + status: unchanged, changed, drifted, rolled-back (back on its previous system), held (not
      activated: an earlier deploy wave failed), failed,
      offline (unreachable, and its data says offline_ok: not a failure) or skipped
    + cause: why (the summary's detail, pyinfra's connect error, the operations that change)
    + paths: for push targets: action, current, profile, desired (before) and after
    """

    status: str
    cause: str = ""
    paths: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "cause": self.cause, **self.paths}


@dataclass(frozen=True)
class DeployResult:
    """
    One pyinfra run of the run: the deploy file, its return code and duration, and hosts.

    + error: why the deploy as a whole failed (pyinfra's last error line), None when it ran
    """

    deploy: str
    returncode: int
    duration_s: float
    hosts: Mapping[str, HostOutcome]
    error: str | None = None
    no_host_matched: bool = False

    @property
    def failed(self) -> bool:
        """Whether the deploy as a whole failed: an error, or pyinfra exiting non-zero, except
        when every host it had was ``offline``: pyinfra then stops with "No hosts remaining!",
        and an owner's laptop away from home is no failure."""
        if self.error:
            return True
        if self.returncode == 0:
            return False
        return not (self.hosts and all(o.status == "offline" for o in self.hosts.values()))

    def as_json(self) -> dict[str, Any]:
        return {
            "deploy": self.deploy,
            "returncode": self.returncode,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
            "hosts": {name: outcome.as_json() for name, outcome in sorted(self.hosts.items())},
        }


# -- reading one deploy's results ------------------------------------------------------


def parse_pyinfra_json(stdout: str) -> dict[str, Any] | None:
    """pyinfra ``--json``'s document (its last line holding a JSON object), None when absent."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
    return None


def connect_errors(log: str) -> dict[str, str]:
    """Host -> pyinfra's reason for not connecting to it, from its log:
    ``Could not connect (timed out)``, ``Could not resolve hostname ([Errno -2] ...)``."""
    found: dict[str, str] = {}
    connecting = False
    for line in _ANSI.sub("", log).splitlines():
        if line.startswith("--> "):
            connecting = line.startswith(_CONNECTING)
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            continue
        said = match["said"].strip()
        if said.startswith(_CONNECT_REASONS) or (connecting and not said.startswith("Connected")):
            found.setdefault(match["host"], said)
    return found


def could_not_connect(reason: str) -> str:
    """A failed host's cause when pyinfra could not connect to it: ``could not connect:
    Could not resolve hostname ([Errno -2] Name or service not known)``."""
    return f"{COULD_NOT_CONNECT}: {reason}"


def last_error(log: str) -> str | None:
    """The last line of pyinfra's log that reads like an error, for a deploy that errored."""
    lines = [line.strip() for line in _ANSI.sub("", log).splitlines() if line.strip()]
    for line in reversed(lines):
        if "rror" in line or line.startswith("--> pyinfra"):
            return line
    return lines[-1] if lines else None


def _changing_ops(pyinfra_json: Mapping[str, Any], executed: bool) -> dict[str, list[str]]:
    """Host -> names of operations that would change it (``--dry``) or did (``-y``)."""
    changing: dict[str, list[str]] = {}
    if executed:
        results = pyinfra_json.get("results") or {}
        for op in results.get("operations") or []:
            for name in op.get("success") or []:
                changing.setdefault(name, []).append(str(op.get("name")))
    else:
        for op in pyinfra_json.get("plan") or []:
            hosts = [
                *(op.get("hosts_with_change") or []),
                *op.get("hosts_with_conditional_change", []),
            ]
            for name in hosts:
                changing.setdefault(name, []).append(str(op.get("name")))
    return changing


def _failed_by_pyinfra(pyinfra_json: Mapping[str, Any]) -> set[str]:
    results = pyinfra_json.get("results") or {}
    failed = set(results.get("failed_hosts") or [])
    for op in results.get("operations") or []:
        failed.update(op.get("error") or [])
    return failed


def _paths(entry: Mapping[str, Any], status: str) -> dict[str, Any]:
    """A target's store paths before and (when known) after the run."""
    if "desired" not in entry:
        return {}
    action = entry.get("action")
    current, profile, desired = entry.get("current"), entry.get("profile"), entry.get("desired")
    before = {"current": current, "profile": profile}
    after: dict[str, Any] | None
    if status == "changed":
        does = Action(action) if action in ACTIONS else None
        after = {
            "current": desired if does is not None and does.makes_current else current,
            "profile": desired if does is not None and does.sets_profile else profile,
        }
    elif status in ("unchanged", "drifted", "rolled-back", "held"):
        after = dict(before)  # nothing was done, or it was undone (verified by the deploy)
    else:
        after = None  # failed: not known what the host runs now
    paths = {"action": action, "desired": desired, "before": before, "after": after}
    if "built_on" in entry:  # the machine that built it: the builder, or a pool member
        paths["built_on"] = entry["built_on"]
    if "revision" in entry:  # the flake's git revision (or narHash) the system comes from
        paths["revision"] = entry["revision"]
    if "reboot_required" in entry:  # known: the new (or running) system's boot files were read
        paths.update(
            reboot_required=entry["reboot_required"], reboot_changes=entry["reboot_changes"]
        )
    return paths


def host_outcomes(
    summary: Mapping[str, Any] | None,
    pyinfra_json: Mapping[str, Any] | None,
    log: str,
    *,
    executed: bool,
    offline_ok: Collection[str] = (),
) -> dict[str, HostOutcome]:
    """
    Every host one deploy mentions, with its outcome. A host pyinfra could not connect to is
    ``failed`` with its reason (``could not connect: ...``), whether or not deploy code ran
    (when none could be reached, pyinfra stops with "No hosts remaining!" and no summary is
    written), or ``offline`` when its data says ``offline_ok``.

    + summary: the run summary's report (``RunSummary.report``), None when the deploy wrote none
    + pyinfra_json: pyinfra's ``--json`` document, None when it printed none
    + log: pyinfra's log (stderr), for connect errors
    + executed: the deploy ran for real (``-y``); else a dry run, whose changes are drift
    + offline_ok: the hosts whose data says ``offline_ok`` (needed only without a summary,
      which says ``offline`` itself)
    """
    hosts: dict[str, HostOutcome] = {}
    changing = _changing_ops(pyinfra_json or {}, executed)
    failed = _failed_by_pyinfra(pyinfra_json or {})
    connect = connect_errors(log)
    summary_hosts: Mapping[str, Any] = (summary or {}).get("hosts") or {}
    changed_status = "changed" if executed else "drifted"

    for name, entry in summary_hosts.items():
        status = {
            "unchanged": "unchanged",
            "deployed": "changed",
            "planned": changed_status,
            "drifted": "drifted",  # a check: the host was switched outside nixpush
            "failed": "failed",
            "rolled-back": "rolled-back",
            "held": "held",
            "offline": "offline",
            "skipped": "skipped",
        }.get(str(entry.get("status")), "failed")
        cause = str(entry.get("cause") or "")
        if status == "failed" and cause == COULD_NOT_CONNECT and name in connect:
            cause = could_not_connect(connect[name])
        if status in ("unchanged", "skipped") and name in failed:
            status, cause = "failed", "an operation failed (see the log)"
        if status == "unchanged" and changing.get(name):
            # Not a push target, but another operation of this deploy changes (or would) it.
            status, cause = changed_status, ", ".join(changing[name])
        hosts[name] = HostOutcome(status, cause, _paths(entry, status))

    for name in sorted(set(changing) | failed | set(connect)):
        if name in hosts:
            continue
        if name in connect and name in offline_ok:
            hosts[name] = HostOutcome("offline", OFFLINE)
        elif name in connect:
            hosts[name] = HostOutcome("failed", could_not_connect(connect[name]))
        elif name in failed:
            hosts[name] = HostOutcome("failed", "an operation failed")
        else:
            hosts[name] = HostOutcome(changed_status, ", ".join(changing[name]))
    return hosts


# -- the whole run ---------------------------------------------------------------------


def merge_hosts(deploys: Sequence[DeployResult]) -> dict[str, dict[str, Any]]:
    """One entry per host over all deploys: the worst status, its cause, its paths."""
    merged: dict[str, dict[str, Any]] = {}
    for deploy in deploys:
        for name, outcome in deploy.hosts.items():
            current = merged.get(name)
            rank = STATUS_ORDER.index(outcome.status)
            if current is None or rank < STATUS_ORDER.index(current["status"]):
                paths = current.get("paths", {}) if current else {}
                merged[name] = {
                    "status": outcome.status,
                    "cause": f"{deploy.deploy}: {outcome.cause}" if outcome.cause else "",
                    "paths": {**paths, **outcome.paths},
                }
            elif outcome.paths:
                current["paths"] = {**current.get("paths", {}), **outcome.paths}
    return {
        name: {"status": e["status"], "cause": e["cause"], **e["paths"]}
        for name, e in sorted(merged.items())
    }


def exit_code(mode: str, deploys: Sequence[DeployResult], hosts: Mapping[str, Any]) -> ExitCode:
    """What the run tells a monitor: failures win over drift; drift counts in check mode only."""
    if any(d.no_host_matched for d in deploys):
        return ExitCode.USAGE
    statuses = {entry["status"] for entry in hosts.values()}
    if statuses & {"failed", "rolled-back", "held"} or any(d.failed for d in deploys):
        return ExitCode.FAILED
    if mode == "check" and "drifted" in statuses:
        return ExitCode.DRIFT
    return ExitCode.OK


def flake_revision(summaries: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | str:
    """Flake ref -> what the builder resolved it to, from the deploys' summaries."""
    flakes: dict[str, Any] = {}
    for summary in summaries:
        flakes.update((summary or {}).get("flakes") or {})
    return flakes or "unknown: no push target was planned in this run"


def human_summary(report: Mapping[str, Any]) -> list[str]:
    """A few lines for a person: the verdict, then one line per host that is not unchanged."""
    code = report["exit_code"]
    verdict = {
        ExitCode.OK: "ok",
        ExitCode.FAILED: "FAILED",
        ExitCode.DRIFT: "drift found",
        ExitCode.USAGE: "usage error",
        ExitCode.LOCKED: "already running",
    }.get(code, str(code))
    lines = [
        f"nixpush {report['mode']}: {verdict} (exit {code}) in {report['duration_s']:.1f}s, "
        f"{len(report['hosts'])} hosts"
    ]
    for name, entry in report["hosts"].items():
        status = entry["status"]
        detail = entry.get("cause", "")
        before, after = entry.get("before"), entry.get("after")
        if status == "drifted" and "desired" in entry:
            now = (before or {}).get("current") or "no system"
            detail = f"runs {now}, wants {entry['desired']}"
        elif status == "changed" and before and after:
            detail = f"{before.get('current') or 'no system'} -> {after.get('current')}"
        lines.append(f"  {name}: {status}{': ' + detail if detail else ''}")
    for deploy in report["deploys"]:
        if deploy["error"]:
            lines.append(f"  {deploy['deploy']}: error: {deploy['error']}")
    return lines


# -- files -----------------------------------------------------------------------------


def report_id(started: datetime, mode: str) -> str:
    """``20250101T030000.123456Z-check``: the run's report name, sortable as text."""
    return f"{started.astimezone(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{mode}"


def write_report(reports: Path, report: Mapping[str, Any]) -> Path:
    """Write the run's report and ``latest.json`` in ``reports``, each atomically; its path."""
    make_dirs(reports, STATE_DIR_MODE)
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    path = reports / f"{report['id']}.json"
    write_atomically(path, text, REPORT_MODE)
    write_atomically(reports / LATEST, text, REPORT_MODE)
    return path


def prune_reports(reports: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` reports (and their logs); return what was removed."""
    if not reports.is_dir():
        return []
    found = sorted(p for p in reports.iterdir() if _REPORT_NAME.match(p.name))
    removed = found[: max(len(found) - keep, 0)]
    for path in removed:
        path.unlink(missing_ok=True)
        path.with_suffix(".log").unlink(missing_ok=True)
    return removed
