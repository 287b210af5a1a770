"""
``nixpush-run --on-failure``: the owner's command, run when a run fails or finds drift (any
exit code but 0 that left a report), so an unattended failure reaches a person.

The command is an argument list (no shell parses it unless it is ``sh -c``); it gets the
report's path as its last argument and the run's human summary on stdin (when the report could
not be written, the summary ends ``report: missing: ...``). Its output is read with undecodable
bytes replaced. It runs at most
``ALERT_TIMEOUT`` seconds (then its whole process group is killed); whatever it does, the run's
exit code stays the run's: a failed alert is printed, never turned into a failed run.

.. code:: python

    alert_error(["/usr/bin/mail", "-s", "nixpush", "beau"], report, path)  # None: it ran fine
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from operations.core.process import run_local_bounded
from operations.core.unattended import ALERT_TIMEOUT
from operations.run.report import ExitCode, human_summary


def wants_alert(report: Mapping[str, Any]) -> bool:
    """A run that failed (1), found drift (2) or matched no host (64) alerts; one that was fine
    does not (and one that found the lock held writes no report and alerts nobody)."""
    return bool(report["exit_code"] != ExitCode.OK)


def alert_error(
    command: Sequence[str],
    report: Mapping[str, Any],
    report_path: Path,
    timeout: float = ALERT_TIMEOUT,
    missing: str | None = None,
) -> str | None:
    """Run ``command`` with the report's path; why it failed (for the log), None when it
    exited 0. Never raises: nothing the command does changes the run's exit code.

    + missing: why the report is not at ``report_path`` (it could not be written); the
      summary on stdin says so"""
    args = [*command, str(report_path)]
    where = f"missing: {missing}" if missing else str(report_path)
    summary = "\n".join(human_summary(report)) + f"\nreport: {where}\n"
    try:
        result = run_local_bounded(args, input=summary, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"on_failure {command[0]} was stopped after {timeout:g}s"
    except (OSError, ValueError) as error:  # ValueError: a NUL in an argument
        return f"on_failure {command[0]} could not run: {error}"
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        return f"on_failure {command[0]} exited {result.returncode}" + (
            f": {said[-1]}" if said else ""
        )
    return None
