"""Fixtures shared by the end-to-end tests: the bench fleet and its push preparation."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.bench import fleet
from tests.bench.client import PushPreparation


@pytest.fixture(scope="session")
def bench() -> Iterator[None]:
    """The bench fleet, up for the whole session; torn down afterwards, leaving nothing."""
    if os.geteuid() != 0:
        pytest.skip("the bench fleet needs root (network namespaces, mounts)")
    # The controller's state dir (nixpush-run's, whose lock a deploy takes when the dir exists)
    # is one of the bench's that does not exist, as on a machine where nixpush-run never ran:
    # a /var/lib/nixpush left on this machine would make side-by-side benches, and two
    # controllers of one test, wait on each other's deploys. nixpush-run's tests pass their own.
    os.environ.setdefault("NIXPUSH_STATE_DIR", str(fleet.BENCH_DIR / "no-nixpush-run-here"))
    fleet.up()
    yield
    if os.environ.get("NIXPUSH_BENCH_KEEP") != "1":
        fleet.down()
        assert fleet.leftovers() == []


@pytest.fixture(scope="session")
def push_preparation(bench: None) -> PushPreparation:
    return PushPreparation()


@pytest.fixture(scope="module")
def push_ready(push_preparation: PushPreparation) -> None:
    """The NAS prepared as builder and the push keys installed, as a user would first do: once
    per session, unless the fleet's hosts changed or started again since (``PushPreparation``).
    A module that changes what the two deploys set up otherwise puts it back before it ends."""
    push_preparation.ensure()
