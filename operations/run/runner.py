"""
``nixpush-run``: nixpush's entry point for unattended runs (a systemd timer, cron).

    nixpush-run check             # dry run of every deploy: which hosts drifted; changes nothing
    nixpush-run deploy            # runs the deploys for real, never asking
    nixpush-run deploy --limit pi4 --wait 600 --state-dir /var/lib/nixpush

Each deploy is one pyinfra CLI run (``--dry`` for check, ``-y`` for deploy; ``--json``; stdin
empty), through ``operations.core.process.run_local``. nixpush's deploys write their run summary to
``NIXPUSH_REPORT_FILE``; with pyinfra's JSON they make one report per run (see
``operations.run.report``). The runner decrypts nothing itself: deploys/secrets.py does, inside
pyinfra, and pyinfra's log never holds a secret's value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NoReturn

from operations.core.files import create_text_file, make_dirs
from operations.core.lock import (
    DEFAULT_STATE_DIR,
    LOCK_FD_ENV,
    LOCK_HELD_ENV,
    STATE_DIR_ENV,
    STATE_DIR_MODE,
    LockError,
    lock_path,
    run_lock,
)
from operations.core.process import find_program, run_local
from operations.core.unattended import DEFAULT_KEEP, DEFAULT_TIMEOUT, SCHEDULE
from operations.data.fleet import read_fleet
from operations.nixos.fragments import fleet_inventory
from operations.push.evalcache import CACHE_DIR_ENV
from operations.run import alerts, metrics, report
from operations.run.report import DeployResult, ExitCode

NO_HOST_MATCHED = "No host matches found for --limit pattern"

EPILOG = """\
exit codes:
  0   success (check: no host drifted)
  1   failures: a host failed or a deploy errored (the report names each with its cause)
  2   drift found (check only; nothing failed)
  64  usage error (bad arguments, missing files, a --limit that matches no host,
      a state dir that cannot be written)
  75  already running: another run held the lock for --wait seconds (no report written)

reports: <state-dir>/reports/<UTC time>-<mode>.json (+ .log: pyinfra's output) and latest.json;
the newest --keep are kept. The lock is <state-dir>/lock (flock), held for the whole run.
--metrics-dir: <dir>/nixpush_<mode>.prom after every run that leaves a report (success times
kept in <state-dir>/metrics-<mode>.json). --on-failure: after a run that exits 1, 2 or 64,
stopped after 60s; neither changes the exit code.
"""


class UsageError(Exception):
    """Bad arguments or setup: exit 64 with this message."""


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on a usage error, which is nixpush-run's "drift found".
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nixpush-run",
        description="Run nixpush's deploys unattended: a drift check or a deploy, under a lock, "
        "leaving a JSON report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=sorted(SCHEDULE), help="check (dry run) or deploy")
    parser.add_argument("--inventory", default="inventory.py", help="default: %(default)s")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="default: %(default)s")
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="wait this long for another run to finish, then exit 75 (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, metavar="N",
        help="reports to keep (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", action="append", default=[], metavar="HOST",
        help="only these hosts or groups (pyinfra's --limit; repeat for more)",
    )  # fmt: skip
    parser.add_argument(
        "--deploy",
        action="append",
        default=[],
        metavar="FILE",
        help="deploy files to run instead of the mode's "
        f"(check: {' '.join(SCHEDULE['check'])}; deploy: {' '.join(SCHEDULE['deploy'])})",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="stop a deploy that runs longer (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--chdir", metavar="DIR", help="the nixpush checkout (default: here)")
    parser.add_argument(
        "--metrics-dir", metavar="DIR",
        help="write node_exporter textfile metrics there (nixpush_<mode>.prom)",
    )  # fmt: skip
    parser.add_argument(
        "--on-failure", action="append", default=[], metavar="ARG",
        help="a command to run when the run fails or finds drift, one --on-failure=ARG per "
        "argument; it gets the report's path as its last argument, the summary on stdin",
    )  # fmt: skip
    return parser


def nixpush_revision(checkout: Path) -> str:
    """``git describe --always --dirty`` of the checkout, else the installed version."""
    try:
        result = run_local(["git", "-C", str(checkout), "describe", "--always", "--dirty"])
    except OSError:
        result = None
    if result is not None and result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip()
    try:
        return f"nixpush {metadata.version('nixpush')} (not a git checkout)"
    except metadata.PackageNotFoundError:
        return "unknown: not a git checkout and nixpush is not installed"


def pyinfra_args(
    program: str, mode: str, inventory: str, deploy: str, limit: Sequence[str]
) -> list[str]:
    """One deploy's pyinfra command line: never interactive, JSON on stdout."""
    # --dry without -y exits before the prompt; -y would turn change detection off.
    how = ["--dry"] if mode == "check" else ["-y"]
    limits = [arg for host in limit for arg in ("--limit", host)]
    return [program, *how, "--json", inventory, deploy, *limits]


def deploy_env(summary_file: Path, state_dir: str, lock_fd: int | None = None) -> dict[str, str]:
    """What a deploy run by nixpush-run gets in its environment: where to write its summary,
    the run lock's descriptor it inherits (``operations.core.lock``: it holds the lock with it, and
    must not wait for it), and where its evaluation cache is (``operations.push.evalcache``):
    in the state directory, the one place a scheduled run may write, unless
    ``NIXPUSH_CACHE_DIR`` says otherwise."""
    env = {
        "NIXPUSH_REPORT_FILE": str(summary_file),
        STATE_DIR_ENV: state_dir,
        LOCK_HELD_ENV: str(lock_path(state_dir)),
        CACHE_DIR_ENV: os.environ.get(CACHE_DIR_ENV) or str(Path(state_dir) / "cache"),
    }
    if lock_fd is not None:
        env[LOCK_FD_ENV] = str(lock_fd)
    return env


def run_deploy(
    program: str,
    mode: str,
    inventory: str,
    deploy: str,
    limit: Sequence[str],
    *,
    scratch: Path,
    timeout: float,
    log: RunLog,
    state_dir: str = DEFAULT_STATE_DIR,
    lock_fd: int | None = None,
) -> tuple[DeployResult, Mapping[str, Any] | None]:
    """Run one deploy; its result and the run summary it wrote (None when it wrote none).
    ``lock_fd``: the run lock's descriptor, which the deploy inherits and holds."""
    summary_file = scratch / f"{Path(deploy).stem}.summary.json"
    summary_file.unlink(missing_ok=True)
    args = pyinfra_args(program, mode, inventory, deploy, limit)
    started = time.monotonic()
    returncode, stdout, stderr, timed_out = _run_pyinfra(
        args, deploy_env(summary_file, state_dir, lock_fd), timeout, lock_fd
    )
    duration = time.monotonic() - started
    log.write(f"==> {' '.join(args[1:])} (exit {returncode}, {duration:.1f}s)\n{stderr}\n")
    sys.stderr.write(stderr)

    summary = _read_summary(summary_file)
    # No summary, yet hosts pyinfra could not connect to: it stopped before any deploy code
    # ran ("No hosts remaining!"), so which of them may be away is read from the inventory.
    away = offline_ok_hosts(inventory) if summary is None and report.connect_errors(stderr) else ()
    hosts = report.host_outcomes(
        summary, report.parse_pyinfra_json(stdout), stderr, executed=mode == "deploy",
        offline_ok=away,
    )  # fmt: skip
    no_match = NO_HOST_MATCHED in stderr
    error = _deploy_error(
        returncode, stderr, hosts, timeout=timeout if timed_out else None,
        no_match=f"{NO_HOST_MATCHED} {' '.join(limit)}" if no_match else None,
    )  # fmt: skip
    return (
        DeployResult(
            deploy=deploy,
            returncode=returncode,
            duration_s=duration,
            hosts=hosts,
            error=error,
            no_host_matched=no_match,
        ),
        summary,
    )


def _run_pyinfra(
    args: Sequence[str], env: Mapping[str, str], timeout: float, lock_fd: int | None
) -> tuple[int, str, str, bool]:
    """pyinfra's exit code, stdout and stderr, and whether it timed out (exit -1)."""
    try:
        result = run_local(
            args, env=env, timeout=timeout, pass_fds=() if lock_fd is None else (lock_fd,)
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else ""
        return -1, "", stderr, True
    return result.returncode, result.stdout, result.stderr, False


def _read_summary(path: Path) -> Mapping[str, Any] | None:
    """The run summary a deploy wrote; None when it wrote none or an unreadable one."""
    if not path.exists():
        return None
    try:
        summary: Mapping[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return summary


def _deploy_error(
    returncode: int,
    stderr: str,
    hosts: Mapping[str, report.HostOutcome],
    *,
    timeout: float | None,
    no_match: str | None,
) -> str | None:
    """What went wrong with the deploy as a whole, beyond its hosts' own outcomes: a time-out,
    no host matched, or a failed exit that no failed (or offline) host explains."""
    if timeout is not None:
        return f"timed out after {timeout:g}s"
    if no_match is not None:
        return no_match
    if (
        returncode != 0
        and not any(o.status == "failed" for o in hosts.values())
        and not (hosts and all(o.status == "offline" for o in hosts.values()))
    ):
        return report.last_error(stderr) or f"pyinfra exited {returncode}"
    return None


class RunLog:
    """The run's ``.log`` (pyinfra's output, deploy by deploy). A disk that fills up loses the
    rest of the log, never the run: the deploys went on, and what they did is reported."""

    def __init__(self, path: Path) -> None:
        self._handle: IO[str] | None = None
        try:
            self._handle = create_text_file(path, report.REPORT_MODE)
        except OSError:
            pass

    def write(self, text: str) -> None:
        if self._handle is None:
            return
        try:
            self._handle.write(text)
            self._handle.flush()
        except OSError:
            self.close()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):  # what it could not flush is lost already
                handle.close()


def scratch_dir(state_dir: str) -> tempfile.TemporaryDirectory[str]:
    """Where the deploys write their run summaries: in the state directory, or, when it cannot
    take a file (a full disk), the system's temporary directory: the summaries are most of what
    the run knows, and it reports them even when its report cannot be written."""
    try:
        scratch = tempfile.TemporaryDirectory(prefix=".run-", dir=state_dir)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="nixpush-run-")
    try:
        (Path(scratch.name) / ".probe").write_text("x" * 4096)
    except OSError:
        scratch.cleanup()
        return tempfile.TemporaryDirectory(prefix="nixpush-run-")
    return scratch


def offline_ok_hosts(inventory: str) -> set[str]:
    """The inventory's hosts whose data says ``offline_ok``, for a deploy that wrote no summary;
    none when the inventory cannot be read (its unreachable hosts are then failed: the safe
    side)."""
    try:
        specs, _ = read_fleet(fleet_inventory(inventory))
    except Exception:  # the owner's file, run again here: whatever it raises, report failed
        return set()
    return {name for name, spec in specs.items() if spec.offline_ok}


def run(args: argparse.Namespace, started: datetime, lock_fd: int | None = None) -> dict[str, Any]:
    """Run the mode's deploys (the lock is held, on ``lock_fd``); the run's report."""
    checkout = Path.cwd()
    program = find_program("pyinfra")
    if program is None:
        raise UsageError("pyinfra is not installed next to nixpush-run nor on PATH")
    reports = Path(args.state_dir) / "reports"
    make_dirs(reports, STATE_DIR_MODE)
    run_id = report.report_id(started, args.mode)
    clock = time.monotonic()
    deploys: list[DeployResult] = []
    summaries: list[Mapping[str, Any] | None] = []
    with (
        contextlib.closing(RunLog(reports / f"{run_id}.log")) as log,
        scratch_dir(args.state_dir) as scratch,
    ):
        for deploy in args.deploy or SCHEDULE[args.mode]:
            result, summary = run_deploy(
                program, args.mode, args.inventory, deploy, args.limit,
                scratch=Path(scratch), timeout=args.timeout, log=log, state_dir=args.state_dir,
                lock_fd=lock_fd,
            )  # fmt: skip
            deploys.append(result)
            summaries.append(summary)
            if result.no_host_matched:
                break
    hosts = report.merge_hosts(deploys)
    code = report.exit_code(args.mode, deploys, hosts)
    return {
        "version": report.REPORT_VERSION,
        "id": run_id,
        "mode": args.mode,
        "started": started.isoformat(),
        "duration_s": round(time.monotonic() - clock, 3),
        "exit_code": int(code),
        "checkout": str(checkout),
        "inventory": args.inventory,
        "limit": list(args.limit),
        "nixpush_revision": nixpush_revision(checkout),
        "flake": report.flake_revision(summaries),
        "hosts": hosts,
        "deploys": [d.as_json() for d in deploys],
    }


def _check_args(args: argparse.Namespace) -> None:
    if args.wait < 0 or args.timeout <= 0 or args.keep < 1:
        raise UsageError("--wait must be >= 0, --timeout > 0 and --keep >= 1")
    for path in (args.inventory, *(args.deploy or SCHEDULE[args.mode])):
        if not Path(path).is_file():
            raise UsageError(f"{path} not found in {Path.cwd()} (run from the nixpush checkout)")


def main(argv: Sequence[str] | None = None) -> int:
    """``nixpush-run``'s command line; returns the exit code (see ``EPILOG``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (64)
        return int(exit_.code or 0)
    try:
        if args.chdir:
            os.chdir(args.chdir)
        _check_args(args)
        with run_lock(lock_path(args.state_dir), args.wait) as held:
            if held is None:
                print(
                    f"nixpush-run: already running (another run holds "
                    f"{Path(args.state_dir) / 'lock'}; waited {args.wait:g}s)",
                    file=sys.stderr,
                )
                return ExitCode.LOCKED
            result = run(args, datetime.now(UTC), held.fd)
            reports = Path(args.state_dir) / "reports"
            path = reports / f"{result['id']}.json"
            result, unwritten = _keep_report(reports, result, args.keep)
            # Under the lock (it reads what the last run kept); with what is known, even when
            # the report is missing: the monitor must see the run that could not record itself.
            record_metrics(args, result)
    except LockError as error:
        print(
            f"nixpush-run: error: cannot lock {lock_path(args.state_dir)} ({error}); keep "
            "--state-dir on a local file system",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    except (UsageError, OSError) as error:
        print(f"nixpush-run: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    for line in report.human_summary(result):
        print(line)
    missing: str | None = None
    if unwritten is not None:
        missing = f"the report could not be written in {reports}: {unwritten}"
        print(f"nixpush-run: error: {missing}", file=sys.stderr)
    else:
        print(f"report: {path}")
    if args.on_failure and alerts.wants_alert(result):
        _alert(args.on_failure, result, path, missing)
    return int(result["exit_code"])


def _keep_report(
    reports: Path, result: dict[str, Any], keep: int
) -> tuple[dict[str, Any], OSError | None]:
    """Write the run's report and prune old ones. One that cannot be written (a full disk)
    fails the run, whose deploys went on: the result with exit 1, and the error."""
    try:
        report.write_report(reports, result)
        report.prune_reports(reports, keep)
    except OSError as error:  # the deploys ran: say what they did, and fail
        if result["exit_code"] in (ExitCode.OK, ExitCode.DRIFT):
            result = {**result, "exit_code": int(ExitCode.FAILED)}
        return result, error
    return result, None


def _alert(
    command: Sequence[str], result: Mapping[str, Any], path: Path, missing: str | None
) -> None:
    """Run ``on_failure`` and say how it went; nothing it does changes the run's exit code."""
    try:
        problem = alerts.alert_error(command, result, path, missing=missing)
    except Exception as error:
        problem = f"on_failure failed: {type(error).__name__}: {error}"
    print(f"nixpush-run: {problem or 'on_failure ran'}", file=sys.stderr)


def record_metrics(args: argparse.Namespace, result: Mapping[str, Any]) -> None:
    """The run's metrics, with --metrics-dir. A metrics file that cannot be written is printed
    (the journal, cron's mail), never a failed run: the report says what happened."""
    if args.metrics_dir:
        try:
            metrics.write_metrics(Path(args.metrics_dir), Path(args.state_dir), result)
        except metrics.TimesNotKept as error:
            print(f"nixpush-run: error: metrics written, but {error}", file=sys.stderr)
        except OSError as error:
            print(f"nixpush-run: error: metrics not written: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
