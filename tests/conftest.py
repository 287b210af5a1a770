"""Fixtures shared by the end-to-end tests: the bench fleet."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.bench import fleet


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
