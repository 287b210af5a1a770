"""What every deploy does first: the inventory check (secrets entries included) and the lock."""

from __future__ import annotations

import inspect
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config
from pyinfra.api.state import State

from operations.core import lock
from operations.core.summary import RunSummary
from operations.data.fleet import FleetError, check_fleet
from operations.push import start
from operations.push.start import register_deploy_file
from tests.unit.test_fleet import fleet


def test_a_broken_secrets_entry_stops_every_deploy_at_its_start(write_inventory):
    entry = {"key": "headscale/pre_auth", "dest": "relative/path", "mode": 0o640}
    inventory = write_inventory(fleet(pi={"secrets": [entry]}))
    with pytest.raises(FleetError) as caught:
        check_fleet(inventory)
    problems = caught.value.problems
    assert any(
        p.startswith("pi: secrets[0] in host data dest is 'relative/path'") for p in problems
    )
    assert any("mode 416 is a number, which reads two ways" in p for p in problems)


def test_fleet_and_secrets_problems_are_listed_together(write_inventory):
    inventory = write_inventory(fleet(nas={"nix_max_jobs": "many"}, pi={"secrets": "x"}))
    with pytest.raises(FleetError) as caught:
        check_fleet(inventory)
    assert [p.split(":")[0] for p in caught.value.problems] == ["nas", "pi"]


def test_a_sound_inventory_gives_its_specs(write_inventory):
    assert sorted(check_fleet(write_inventory(fleet()))) == ["nas", "pi"]


def _hold(path: str, ready: Any, release: Any) -> None:
    with lock.run_lock(Path(path), wait=0) as locked:
        assert locked
        ready.set()
        release.wait(10)


@pytest.fixture
def held(tmp_path, monkeypatch):
    """nixpush-run (another process) holding <tmp>/state/lock; no lock held by this process."""
    monkeypatch.setattr(lock, "_held", {})
    state = tmp_path / "state"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(state / "lock"), ready, release))
    holder.start()
    assert ready.wait(10)
    yield state
    release.set()
    holder.join(10)


def test_a_deploy_by_hand_waits_briefly_for_a_scheduled_run_then_fails_clearly(held):
    environ = {"NIXPUSH_STATE_DIR": str(held), "NIXPUSH_LOCK_WAIT": "0.3"}
    started = time.monotonic()
    with pytest.raises(lock.LockBusy) as busy:
        lock.hold_deploy_lock(environ)
    assert 0.3 <= time.monotonic() - started < 2
    assert str(busy.value) == (
        f"another nixpush run holds {held}/lock (nixpush-run, or another deploy); waited 0.3s; "
        "run again when it has finished (its report says when), or wait longer with "
        "NIXPUSH_LOCK_WAIT=SECONDS"
    )


def test_a_free_lock_is_held_until_the_process_exits(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_held", {})
    (tmp_path / "state").mkdir()
    environ = {"NIXPUSH_STATE_DIR": str(tmp_path / "state"), "NIXPUSH_LOCK_WAIT": "0"}
    assert lock.hold_deploy_lock(environ) == tmp_path / "state" / "lock"
    assert lock.hold_deploy_lock(environ) == tmp_path / "state" / "lock"  # once per process
    with lock.run_lock(tmp_path / "state" / "lock", wait=0) as locked:
        assert not locked  # a nixpush-run starting now would wait
    lock._held.pop(tmp_path / "state" / "lock").close()


def test_no_state_dir_means_no_nixpush_run_to_wait_for(tmp_path):
    assert lock.hold_deploy_lock({"NIXPUSH_STATE_DIR": str(tmp_path / "none")}) is None


def test_the_deploy_file_is_a_module_to_inspect_so_no_stack_rescans_sys_modules(
    tmp_path, monkeypatch
):
    # pyinfra execs the deploy file (compiled under the name it was given) and orders each
    # operation call with inspect.stack(): every frame's module is looked up.
    monkeypatch.chdir(tmp_path)
    Path("deploy.py").write_text("import inspect\nframe = inspect.currentframe()\n")
    code = compile(Path("deploy.py").read_text(), "deploy.py", "exec")
    exec_namespace: dict[str, Any] = {"__file__": "deploy.py"}
    exec(code, exec_namespace)
    frame = exec_namespace["frame"]
    assert inspect.getmodule(frame) is None  # nothing to find: every lookup scans again

    module = register_deploy_file("deploy.py")

    assert inspect.getmodule(frame) is module
    # Remembered by file: the next lookup is a dictionary hit, not a scan of sys.modules.
    assert inspect.modulesbyfile[os.path.normcase(str(tmp_path / "deploy.py"))] == module.__name__
    assert register_deploy_file("deploy.py") is module  # once per file


def _started_run(monkeypatch, tmp_path, inventory):  # type: ignore[no-untyped-def]
    """``start_deploy`` on a new pyinfra State, with no lock to take and a summary that
    prints nothing at exit."""
    monkeypatch.setenv("NIXPUSH_STATE_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(start, "summary_for", RunSummary)
    return State(inventory, Config())


def test_each_run_gets_its_own_cache_and_every_deploy_file_of_a_run_shares_it(
    write_inventory, monkeypatch, tmp_path
):
    inventory = write_inventory(fleet())
    run = _started_run(monkeypatch, tmp_path, inventory)
    secrets = start.start_deploy(run)
    run.current_deploy_filename = "deploys/pi.py"  # the next file of a chained run
    pi = start.start_deploy(run)
    other_run = start.start_deploy(State(inventory, Config()))

    assert pi is secrets and pi.cache is secrets.cache
    assert other_run.cache is not pi.cache
    # The checked specs, passed on: nothing parses a host's data again.
    assert pi.cache.specs is pi.specs and pi.specs["pi"].builder_host == "nas"
