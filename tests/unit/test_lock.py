"""The lock's edges: nixpush-run's deploys hold its lock themselves (an orphaned one
is never unlocked), a lock file that cannot be locked is a clear error, and a ``--dry`` run
never takes the deploy lock."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from operations.core import lock
from operations.run import runner
from operations.run.report import ExitCode
from tests.unit.conftest import REPO
from tests.unit.test_runner import checkout  # noqa: F401 (a fixture)
from tests.unit.test_start import held  # noqa: F401 (a fixture)


def lock_is_free(path: Path) -> bool:
    with lock.run_lock(path, wait=0) as locked:
        return bool(locked)


def test_a_deploy_orphaned_by_a_killed_runner_still_holds_the_lock(checkout, monkeypatch):  # noqa: F811
    # A stand-in pyinfra that leaves a child behind (pyinfra's own, or one the runner's death
    # orphaned): it runs on after nixpush-run has gone.
    pidfile = checkout / "orphan.pid"
    fake = checkout / "pyinfra"
    fake.write_text(f"#!/bin/sh\nsleep 30 </dev/null >/dev/null 2>&1 &\necho $! > {pidfile}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runner, "find_program", lambda name: str(fake))
    state = checkout / "state"

    runner.main(["deploy", "--state-dir", str(state)])

    orphan = int(pidfile.read_text())
    try:
        assert not lock_is_free(state / "lock")  # the orphan holds the runner's lock
    finally:
        os.kill(orphan, signal.SIGKILL)  # not our child: its new parent reaps it
    deadline = time.monotonic() + 5
    while not lock_is_free(state / "lock"):
        assert time.monotonic() < deadline, "the lock outlived its last holder"
        time.sleep(0.05)


def test_deploys_are_given_the_runners_descriptor(checkout, monkeypatch):  # noqa: F811
    calls: list[dict[str, Any]] = []

    def fake(args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(kwargs)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(runner, "run_local", fake)
    monkeypatch.setattr(runner, "find_program", lambda name: f"/venv/bin/{name}")
    runner.main(["deploy", "--state-dir", str(checkout / "state")])
    (deploy,) = [c for c in calls if c.get("pass_fds")]
    (fd,) = deploy["pass_fds"]
    assert deploy["env"]["NIXPUSH_LOCK_FD"] == str(fd)
    assert deploy["env"]["NIXPUSH_LOCK_HELD"] == f"{checkout}/state/lock"


def test_a_deploy_takes_the_inherited_lock_again_without_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_held", {})
    state = tmp_path / "state"
    with lock.run_lock(state / "lock", wait=0) as locked:
        assert locked is not None
        environ = {
            "NIXPUSH_STATE_DIR": str(state),
            "NIXPUSH_LOCK_HELD": str(state / "lock"),
            "NIXPUSH_LOCK_FD": str(locked.fd),
            "NIXPUSH_LOCK_WAIT": "0",
        }
        assert lock.hold_deploy_lock(environ) == state / "lock"
        lock._held.pop(state / "lock")  # the runner's descriptor: not this test's to close


def test_the_lock_env_alone_is_no_proof_of_holding_it(held):  # noqa: F811
    # Left in a shell's environment, say: without the descriptor the deploy waits like any.
    environ = {
        "NIXPUSH_STATE_DIR": str(held),
        "NIXPUSH_LOCK_HELD": f"{held}/lock",
        "NIXPUSH_LOCK_FD": "0",  # open, but not the lock
        "NIXPUSH_LOCK_WAIT": "0.2",
    }
    with pytest.raises(lock.LockBusy):
        lock.hold_deploy_lock(environ)


def _no_flock(fd: Any, operation: int) -> None:
    raise OSError(errno.EBADF, os.strerror(errno.EBADF))  # NFS, a lock file opened read-only


def test_a_lock_file_that_cannot_be_locked_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_held", {})
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    with pytest.raises(lock.LockBusy) as refused:
        lock.hold_deploy_lock({"NIXPUSH_STATE_DIR": str(tmp_path / "state")})
    assert str(refused.value) == (
        f"cannot lock nixpush-run's lock {tmp_path}/state/lock ([Errno 9] Bad file descriptor), "
        "so this deploy could overlap a scheduled run; keep the state dir on a local file "
        "system, or set NIXPUSH_STATE_DIR to one that is"
    )


def test_nixpush_run_says_why_it_cannot_lock(checkout, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    code = runner.main(["check", "--state-dir", str(checkout / "state")])
    assert code == ExitCode.USAGE
    assert capsys.readouterr().err == (
        f"nixpush-run: error: cannot lock {checkout}/state/lock ([Errno 9] Bad file descriptor); "
        "keep --state-dir on a local file system\n"
    )


def test_a_lock_file_on_a_read_only_file_system_is_taken_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_held", {})
    state = tmp_path / "state"
    state.mkdir()
    (state / "lock").touch()
    opened: list[str] = []
    real_open = open

    def read_only_fs(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened.append(mode)
        if path == state / "lock" and mode != "r":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_fs)
    assert lock.hold_deploy_lock({"NIXPUSH_STATE_DIR": str(state)}) == state / "lock"
    assert opened == ["a", "r"]
    lock._held.pop(state / "lock").close()


# -- --dry ------------------------------------------------------------------------------


def pyinfra_run(tmp_path: Path, *flags: str, state: Path) -> subprocess.CompletedProcess[str]:
    """A real ``pyinfra @local deploy.py`` whose deploy code takes the deploy lock."""
    deploy = [
        "from operations.core.lock import hold_deploy_lock",
        "print('lock:', hold_deploy_lock())",
    ]
    (tmp_path / "deploy.py").write_text("\n".join(deploy) + "\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "NIXPUSH_STATE_DIR": str(state),
        "NIXPUSH_LOCK_WAIT": "0.2",
    }
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", *flags, "@local", "deploy.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_a_dry_run_never_takes_the_deploy_lock(tmp_path, held):  # noqa: F811
    dry = pyinfra_run(tmp_path, "--dry", state=held)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "lock: None" in dry.stdout

    real = pyinfra_run(tmp_path, "-y", state=held)  # the same, for real: it waits, then fails
    assert real.returncode == 1, real.stdout + real.stderr
    assert "another nixpush run holds" in real.stderr
