"""Fixtures shared by the end-to-end tests: the bench fleet."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.bench import fleet
from tests.bench.client import prepare_push


@pytest.fixture(scope="session")
def bench() -> Iterator[None]:
    """The bench fleet, up for the whole session; torn down afterwards, leaving nothing."""
    if os.geteuid() != 0:
        pytest.skip("the bench fleet needs root (network namespaces, mounts)")
    fleet.up()
    yield
    if os.environ.get("NIXPUSH_BENCH_KEEP") != "1":
        fleet.down()
        assert fleet.leftovers() == []


@pytest.fixture(scope="session")
def push_ready(bench: None) -> None:
    """The NAS prepared as builder and the push keys installed, as a user would first do.

    Once per session: the two deploys are idempotent, and a module that changes what they set
    up (another fleet, a key taken away) puts it back before it ends.
    """
    prepare_push()
