"""
One nixpush run at a time on a controller: the ``flock`` that ``nixpush-run`` holds for a whole
run (``<state-dir>/lock``), and that every deploy takes too (``operations.push.start``), so a
``pyinfra inventory.py deploys/pi.py`` typed by hand never runs alongside a timer-fired run.

``nixpush-run`` runs its deploys as child processes while it holds the lock, and hands them its
descriptor of it (``NIXPUSH_LOCK_FD``, with the lock's path in ``NIXPUSH_LOCK_HELD``): a
``flock`` belongs to the open file, so a deploy holds the lock as long as it runs, even when
the runner is killed first. A deploy checks that the descriptor is the lock and takes it
again (at once: it is its own); without it, it waits like any other.
A ``pyinfra --dry`` run changes nothing and takes no lock.

.. code:: python

    with run_lock(Path("/var/lib/nixpush/lock"), wait=600) as held:
        run_local([...], env={LOCK_FD_ENV: str(held.fd), ...}, pass_fds=(held.fd,))
    hold_deploy_lock()  # in deploy code: held until the pyinfra process exits
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import click
import pyinfra
from pyinfra.api.exceptions import PyinfraError

from operations.core.files import make_dirs

DEFAULT_STATE_DIR = "/var/lib/nixpush"
# Group readable, so a monitor in the state dir's group can read reports; nobody else.
STATE_DIR_MODE = 0o750
LOCK_NAME = "lock"
# Set by nixpush-run for its deploys: the path of the lock it holds for them, and its
# descriptor of it, which they inherit.
LOCK_HELD_ENV = "NIXPUSH_LOCK_HELD"
LOCK_FD_ENV = "NIXPUSH_LOCK_FD"
# The state dir whose lock a deploy takes (nixpush-run's --state-dir), and how long it waits.
STATE_DIR_ENV = "NIXPUSH_STATE_DIR"
WAIT_ENV = "NIXPUSH_LOCK_WAIT"
DEFAULT_DEPLOY_WAIT = 10.0

_held: dict[Path, IO[str]] = {}
_taking = threading.Lock()  # deploy code runs once per host, in parallel greenlets


class LockBusy(PyinfraError):
    """Another nixpush run holds the lock, or it cannot be taken; the message names it and
    what to do."""


class LockError(OSError):
    """The lock file could not be locked (``flock`` failed: EBADF on NFS, ENOLCK)."""


@dataclass(frozen=True)
class Held:
    """A lock this process holds: its path and the descriptor its ``flock`` is on."""

    path: Path
    fd: int


def lock_path(state_dir: str | Path) -> Path:
    """``/var/lib/nixpush/lock`` for ``/var/lib/nixpush``."""
    return Path(state_dir) / LOCK_NAME


def _acquire(fd: int, wait: float, poll: float) -> bool:
    """Take the lock on ``fd`` within ``wait`` seconds; ``LockError`` when it can't be locked
    at all."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        except OSError as error:
            raise LockError(error.errno, error.strerror) from None


@contextmanager
def run_lock(path: Path, wait: float, poll: float = 0.1) -> Iterator[Held | None]:
    """
    Hold an exclusive ``flock`` on ``path`` for the block; yields None if another process
    still holds it after ``wait`` seconds. The kernel drops the lock when the last process
    holding its descriptor (this one, or a child it passed it to) ends. ``LockError`` when
    the file cannot be locked.
    """
    make_dirs(path.parent, STATE_DIR_MODE)
    # Closing releases the lock; unlocking (LOCK_UN) would release it for the children that
    # share the open file too.
    with open(path, "a") as handle:
        if not _acquire(handle.fileno(), wait, poll):
            yield None
            return
        yield Held(path, handle.fileno())


@functools.cache
def _dry_run() -> bool:
    """Whether this process is a ``pyinfra --dry`` run, read from its command line by pyinfra's
    own parser (deploy code runs in greenlets, which don't see the CLI's click context)."""
    if not pyinfra.is_cli:
        return False
    from pyinfra_cli.cli import cli  # the CLI's parser: only when this is the CLI

    try:
        context = cli.make_context("pyinfra", sys.argv[1:], resilient_parsing=True)
    except click.ClickException:
        return False
    return bool(context.params.get("dry"))


def _inherited(path: Path, environ: Mapping[str, str]) -> IO[str] | None:
    """The descriptor of ``path``'s lock nixpush-run passed down, taken again (its own
    ``flock``: at once), or None when there is none, or it is not that lock."""
    fd_text = environ.get(LOCK_FD_ENV, "")
    if environ.get(LOCK_HELD_ENV) != str(path) or not fd_text.isdecimal():
        return None
    fd = int(fd_text)
    try:
        held, lock = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) != (lock.st_dev, lock.st_ino):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # closed, or someone else's: take it like any deploy
        return None
    return os.fdopen(fd, "a", closefd=False)  # open as long as this process runs


def _open_lock(path: Path) -> IO[str]:
    try:
        return open(path, "a")  # held until the process exits
    except OSError:  # another user's, or a read-only file system: flock works read-only too
        return open(path)


def hold_deploy_lock(environ: Mapping[str, str] = os.environ, poll: float = 0.1) -> Path | None:
    """
    Take nixpush-run's lock for the rest of this process (a deploy), waiting
    ``NIXPUSH_LOCK_WAIT`` seconds (default 10) before ``LockBusy``. Returns the lock's path,
    or None when there is nothing to take: a ``--dry`` run (it changes nothing), or the state
    dir does not exist (no nixpush-run ever ran with it). One of nixpush-run's deploys takes
    the descriptor it inherited (``NIXPUSH_LOCK_FD``) again, without waiting.
    """
    path = lock_path(environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
    if _dry_run() or not path.parent.is_dir():
        return None
    with _taking:
        if path in _held:
            return path
        inherited = _inherited(path, environ)
        if inherited is not None:
            _held[path] = inherited
            return path
        try:
            handle = _open_lock(path)
        except OSError as error:
            raise LockBusy(
                f"cannot open nixpush-run's lock {path} ({error.strerror}), so this deploy "
                "could overlap a scheduled run; run it as the schedule's user, or set "
                f"{STATE_DIR_ENV} to the state dir nixpush-run uses"
            ) from None
        wait = float(environ.get(WAIT_ENV) or DEFAULT_DEPLOY_WAIT)
        try:
            taken = _acquire(handle.fileno(), wait, poll)
        except LockError as error:
            handle.close()
            raise LockBusy(
                f"cannot lock nixpush-run's lock {path} ({error}), so this deploy could "
                "overlap a scheduled run; keep the state dir on a local file system, or set "
                f"{STATE_DIR_ENV} to one that is"
            ) from None
        if not taken:
            handle.close()
            raise LockBusy(
                f"another nixpush run holds {path} (nixpush-run, or another deploy); waited "
                f"{wait:g}s; run again when it has finished (its report says when), or wait "
                f"longer with {WAIT_ENV}=SECONDS"
            )
        _held[path] = handle
        return path


def is_dry_run() -> bool:
    """Whether this process is a ``pyinfra --dry`` run: deploy code may then read (never
    change) what a step would do, to show it."""
    return _dry_run()
