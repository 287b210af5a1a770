"""What a run keeps on the controller: one object per pyinfra State, nothing at module level,
decrypted values dropped when the run ends."""

from __future__ import annotations

import collections
import importlib
import pkgutil
import weakref
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.context import ctx_state

import operations
from operations.core import runstate
from operations.core.models import Plaintext
from operations.core.runstate import Run, current_run, run_of, summary_for
from operations.data import steady
from operations.push import start
from operations.trust import keys, sops
from tests.unit.test_fleet import fleet

_MUTABLE = (
    dict, list, set, bytearray, collections.deque,
    weakref.WeakKeyDictionary, weakref.WeakValueDictionary, weakref.WeakSet,
)  # fmt: skip
# The registry of runs by State (an entry goes with its State), and the deploy lock's handles:
# the process holds the lock until it exits, whatever runs it makes.
_ALLOWED = {("operations.core.runstate", "_runs"), ("operations.core.lock", "_held")}


def _modules() -> list[Any]:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(operations.__path__, "operations.")
    ]


def test_no_module_keeps_run_state():
    # Constants are UPPER_CASE by convention (tables, patterns); anything else mutable at module
    # level would outlive its run and be shared by the next.
    found = [
        (module.__name__, name)
        for module in _modules()
        for name, value in vars(module).items()
        if isinstance(value, _MUTABLE) and not name.isupper() and not name.startswith("__")
    ]
    assert sorted(found) == sorted(_ALLOWED)


@pytest.fixture
def decrypts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """sops stands in: each decryption is recorded, its value names the key path."""
    calls: list[str] = []

    def run_sops(file: Any, path: Any, data_key: str) -> Plaintext:
        calls.append(str(file))
        return Plaintext("/".join(path), f"value of {'/'.join(path)}")

    monkeypatch.setattr(sops, "_run_sops", run_sops)
    return calls


def test_two_runs_in_one_process_share_nothing(write_inventory, decrypts, monkeypatch, tmp_path):
    monkeypatch.setenv("NIXPUSH_STATE_DIR", str(tmp_path / "none"))  # no lock to take
    monkeypatch.setattr(keys, "run_local", _keygen)
    monkeypatch.setattr(runstate.atexit, "register", lambda *args: None)  # no summary printed
    inventory = write_inventory(fleet())
    first, second = State(inventory, Config()), State(inventory, Config())

    def one_run(state: State) -> Run:
        with ctx_state.use(state):
            sops.decrypt("secrets.yaml", ("a",))
            keys.ssh_public_key(Plaintext("k", "private"))
            current_run().host_kinds["pi"] = frozenset({"nixos"})
            summary_for(state).fail("pi", "build failed")
            start.start_deploy(state)
            return current_run()

    one, other = one_run(first), one_run(second)

    assert one is run_of(first) and other is run_of(second) and one is not other
    assert len(decrypts) == 2  # each run decrypts for itself
    for attribute in ("decrypted", "ssh_public_keys", "host_kinds", "summary", "deploy"):
        assert getattr(one, attribute) is not getattr(other, attribute), attribute
    assert one.decrypted == other.decrypted  # equal values, never the same objects
    with ctx_state.use(second):
        assert steady.known_nixos(inventory.get_host("pi"))
    other.host_kinds.clear()
    with ctx_state.use(first):
        assert steady.known_nixos(inventory.get_host("pi"))  # the first run still knows


def _keygen(argv: list[str], **kwargs: Any) -> Any:
    class Result:
        returncode, stdout, stderr = 0, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 k\n", ""

    return Result()


def test_a_run_drops_its_decrypted_values_when_it_ends(decrypts):
    state = State(Inventory((["@local"], {})), Config())
    with ctx_state.use(state):
        connect_all(state)
        value = sops.decrypt("secrets.yaml", ("ssh", "nas_deploy"))
        assert current_run().decrypted == {
            (str(Path("secrets.yaml").absolute()), ("ssh", "nas_deploy")): value
        }
        sops.decrypt("secrets.yaml", ("ssh", "nas_deploy"))
        assert len(decrypts) == 1  # kept during the run

        disconnect_all(state)  # what the CLI does last, after --dry and failures too

        assert current_run().decrypted == {}


def test_outside_a_run_nothing_is_kept():
    with ctx_state.use(None), pytest.raises(RuntimeError, match="no pyinfra run"):
        current_run()
