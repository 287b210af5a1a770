"""
Long steps (evaluate, build, copy) say how far they are while they run, at default verbosity:
a first line after ``FIRST_REPORT`` seconds, then one every ``REPORT_EVERY`` seconds, so a
step is never silent for long. A Nix step writes its log (internal-json) to a file on the
builder; a reader polls it through the same bounded session seam as everything else and turns
it into a line such as ``building: 1 of 3 derivations built, building nixos-system-pi4 (25 s)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import gevent
from pyinfra import logger

from operations.core.failures import DeployFailed
from operations.core.process import run_on
from operations.push.commands import TIMED_OUT_MARK, read_log_command

if TYPE_CHECKING:
    from pyinfra.api.command import StringCommand
    from pyinfra.api.host import Host

FIRST_REPORT = 5.0
REPORT_EVERY = 9.0


def log_path() -> str:
    """A fresh log file name on the builder (unguessable: created with noclobber)."""
    return f"/tmp/nixpush-{uuid.uuid4().hex}.log"


def report_progress(
    work: Callable[[], tuple[bool, list[str]]],
    line: Callable[[], str | None],
    show: Callable[[str], None],
    *,
    first: float = FIRST_REPORT,
    every: float = REPORT_EVERY,
) -> tuple[bool, list[str]]:
    """
    Run ``work`` in a greenlet; while it runs, ``show`` ``line()`` (or just the time) after
    ``first`` seconds and then every ``every`` seconds. ``work``'s answer, or its exception.
    """
    started = time.monotonic()
    job = gevent.spawn(work)
    deadline = first
    while not job.ready():
        job.join(timeout=max(0.0, started + deadline - time.monotonic()))
        if job.ready():
            break
        seconds = time.monotonic() - started
        try:
            text = line()
        except DeployFailed as error:  # the reader lost its channel: the step goes on
            text = f"(progress unreadable: {error})"
        show(f"{text} ({seconds:.0f} s)" if text else f"still running ({seconds:.0f} s)")
        deadline += every
    result: tuple[bool, list[str]] = job.get()
    return result


def run_watched(
    host: Host,
    command: Callable[[str], StringCommand],
    *,
    describe: Callable[[Sequence[str]], str | None],
    show: Callable[[str], None],
    sudo: bool,
    doing: str,
    timeout: int,
    timeout_key: str,
    env: dict[str, str] | None = None,
    read: Callable[[str], StringCommand] = read_log_command,
) -> tuple[bool, list[str]]:
    """
    Run ``command(log)`` (built with ``commands.logged``) on ``host`` and report its progress:
    ``describe`` turns the log so far (as ``read(log)`` prints it) into a line for ``show``.
    ``DeployFailed`` when it runs out of time, naming the step, the host and the data key
    that sets the limit.
    """
    log = log_path()

    def work() -> tuple[bool, list[str]]:
        # pyinfra's own limit is a backstop: timeout(1) on the host stops the step first.
        return run_on(host, command(log), sudo=sudo, env=env, timeout=timeout + 30, doing=doing)

    def line() -> str | None:
        ok, lines = run_on(host, read(log), sudo=sudo, doing=f"reading {log}")
        return describe(lines) if ok else None

    try:
        ok, lines = report_progress(work, line, show)
    except DeployFailed as failure:
        if "timed out" not in str(failure):
            raise
        ok, lines = False, [TIMED_OUT_MARK]
    if not ok and _timed_out(lines):
        raise DeployFailed(
            f"{doing} on {host.name} timed out after {timeout} s: raise {timeout_key} in "
            f"{host.name}'s host data"
        )
    return ok, lines


def _timed_out(lines: Sequence[str]) -> bool:
    return any(line.strip() == TIMED_OUT_MARK for line in lines)


def shower(host: Host, step: str) -> Callable[[str], None]:
    """Progress lines for ``host``'s output: ``[nas] building: ...``."""
    return lambda text: host.log_styled(f"{step}: {text}", log_func=logger.info)
