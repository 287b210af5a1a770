"""
One nixpush run at a time on a controller: the ``flock`` that ``nixpush-run`` holds for a whole
run (``<state-dir>/lock``), and that every deploy takes too (``operations.start``), so a
``pyinfra inventory.py deploys/pi.py`` typed by hand never runs alongside a timer-fired run.

``nixpush-run`` runs its deploys as child processes while it holds the lock; it tells them so
with ``NIXPUSH_LOCK_HELD`` (the lock's path), and they don't wait for it.

.. code:: python

    with run_lock(Path("/var/lib/nixpush/lock"), wait=600) as locked:
        ...
    hold_deploy_lock()  # in deploy code: held until the pyinfra process exits
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pyinfra.api.exceptions import PyinfraError

from operations.files import make_dirs

DEFAULT_STATE_DIR = "/var/lib/nixpush"
# Group readable, so a monitor in the state dir's group can read reports; nobody else.
STATE_DIR_MODE = 0o750
LOCK_NAME = "lock"
# Set by nixpush-run for its deploys: the path of the lock it holds for them.
LOCK_HELD_ENV = "NIXPUSH_LOCK_HELD"
# The state dir whose lock a deploy takes (nixpush-run's --state-dir), and how long it waits.
STATE_DIR_ENV = "NIXPUSH_STATE_DIR"
WAIT_ENV = "NIXPUSH_LOCK_WAIT"
DEFAULT_DEPLOY_WAIT = 10.0

_held: dict[Path, IO[str]] = {}
_taking = threading.Lock()  # deploy code runs once per host, in parallel greenlets


class LockBusy(PyinfraError):
    """Another nixpush run holds the lock; the message names it and what to do."""


def lock_path(state_dir: str | Path) -> Path:
    """``/var/lib/nixpush/lock`` for ``/var/lib/nixpush``."""
    return Path(state_dir) / LOCK_NAME


def _acquire(handle: IO[str], wait: float, poll: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


@contextmanager
def run_lock(path: Path, wait: float, poll: float = 0.1) -> Iterator[bool]:
    """
    Hold an exclusive ``flock`` on ``path`` for the block; yields False if another process
    still holds it after ``wait`` seconds. The kernel drops the lock when the process dies.
    """
    make_dirs(path.parent, STATE_DIR_MODE)
    with open(path, "a") as handle:
        if not _acquire(handle, wait, poll):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def hold_deploy_lock(environ: Mapping[str, str] = os.environ, poll: float = 0.1) -> Path | None:
    """
    Take nixpush-run's lock for the rest of this process (a deploy), waiting
    ``NIXPUSH_LOCK_WAIT`` seconds (default 10) before ``LockBusy``. Returns the lock's path,
    or None when there is nothing to take: the state dir does not exist (no nixpush-run ever
    ran with it), or this process is one of nixpush-run's deploys (``NIXPUSH_LOCK_HELD``).
    """
    path = lock_path(environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
    if environ.get(LOCK_HELD_ENV) == str(path) or not path.parent.is_dir():
        return None
    with _taking:
        if path in _held:
            return path
        try:
            handle = open(path, "a")  # held until the process exits
        except PermissionError:
            try:
                handle = open(path)  # flock works on a read-only file too
            except OSError as error:
                raise LockBusy(
                    f"cannot open nixpush-run's lock {path} ({error.strerror}), so this deploy "
                    "could overlap a scheduled run; run it as the schedule's user, or set "
                    f"{STATE_DIR_ENV} to the state dir nixpush-run uses"
                ) from None
        wait = float(environ.get(WAIT_ENV) or DEFAULT_DEPLOY_WAIT)
        if not _acquire(handle, wait, poll):
            handle.close()
            raise LockBusy(
                f"another nixpush run holds {path} (nixpush-run, or another deploy); waited "
                f"{wait:g}s; run again when it has finished (its report says when), or wait "
                f"longer with {WAIT_ENV}=SECONDS"
            )
        _held[path] = handle
        return path
