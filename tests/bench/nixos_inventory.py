"""The bench fleet as a NixOS owner's: pull builds on (tests/bench/pull_inventory.py), nixpush's
schedule on the NAS, and fragments written under the bench directory.

``deploys/nixos_config.py`` writes a fragment per host from it; tests/e2e/test_nixos.py marks
the NAS and pi4 NixOS (``/etc/NIXOS``), applies those fragments by hand the way NixOS would,
and checks that every deploy finds them already configured.

Run from the repository root:
``pyinfra @local deploys/nixos_config.py --data nixpush_inventory=tests/bench/nixos_inventory.py``.
"""

from typing import Any

from tests.bench import fleet as _fleet
from tests.bench import pull_inventory as _pull
from tests.bench import sops as _sops
from tests.bench.client import BENCH_INVENTORY as _INVENTORY

FRAGMENTS_DIR = _fleet.BENCH_DIR / "nixos-fragments"

_SCHEDULE = {
    "enabled": True,
    "checkout": str(_fleet.REPO),
    "program": str(_fleet.REPO / ".venv" / "bin" / "nixpush-run"),
    "user": "root",
    "age_key_file": str(_sops.AGE_KEY_FILE),
    "inventory": _INVENTORY,
    "state_dir": "/var/lib/nixpush",
    "runs": {
        "check": {"on_calendar": "hourly", "randomized_delay": "10min"},
        "deploy": {"on_calendar": "*-*-* 03:30:00", "limit": ["pi4"]},
    },
}


def _nixos(members: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            name,
            {
                **data,
                "nixos_fragments_dir": str(FRAGMENTS_DIR),
                **({"schedule": _SCHEDULE} if name == _fleet.BUILDER else {}),
            },
        )
        for name, data in members
    ]


minimal = _nixos(_pull.minimal)
common = _nixos(_pull.common)
network = _nixos(_pull.network)
main = _nixos(_pull.main)
server = _nixos(_pull.server)
