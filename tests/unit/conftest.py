"""Load inventories the way the pyinfra CLI does, so tests walk the path a user's run takes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

REPO = Path(__file__).resolve().parents[2]

Member = tuple[str, dict[str, Any]]


@pytest.fixture(autouse=True)
def _own_run() -> Iterator[None]:
    """Every test is a pyinfra run of its own: what a run keeps (``operations.core.runstate``)
    lives on the current State, so nothing carries over from one test to the next."""
    with ctx_state.use(State()):
        yield


def load_inventory(path: Path, cwd: Path, override_data: dict[str, Any] | None = None) -> Inventory:
    """What ``pyinfra PATH ...`` run from ``cwd`` builds, ``--data`` as ``override_data``."""
    # The CLI's loader executes the files under a State (it records the current filename).
    with ctx_state.use(State()):
        return make_inventory(str(path), override_data=override_data, cwd=str(cwd))


@pytest.fixture
def write_inventory(tmp_path: Path) -> Callable[..., Inventory]:
    """Write groups (name -> members) and group data (root -> source) to tmp_path and load them."""

    def write(
        groups: dict[str, list[Member]],
        group_data: dict[str, str] | None = None,
        override_data: dict[str, Any] | None = None,
        filename: str = "inventory.py",
    ) -> Inventory:
        source = "".join(f"{name} = {members!r}\n" for name, members in groups.items())
        path = tmp_path / filename
        path.write_text(source)
        if group_data:
            (tmp_path / "group_data").mkdir(exist_ok=True)
            for root, data_source in group_data.items():
                (tmp_path / "group_data" / f"{root}.py").write_text(data_source)
        return load_inventory(path, tmp_path, override_data)

    return write
