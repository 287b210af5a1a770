"""The bench fleet with nixpush's schedule on pis, the bench Pi whose PID 1 is systemd:
``deploys/schedule.py`` installs timers there that run ``nixpush-run check`` on pis itself.

The same hosts and data as ``tests/bench/inventory.py``, plus ``schedule`` (enabled) for every
systemd host. The timer's run is a drift check of that host alone, against the plain bench
inventory, as root, from a copy of this checkout under the bench directory, with the bench's age
key; its reports land in the host's own ``/var/lib/nixpush``. The program is the bench's runner
virtualenv, made from that copy (``tests.bench.systemd_host.ensure_runner_venv``, see there why
neither this checkout nor its ``.venv``: the host may not see them). The calendar is
hourly: tests make a timer fire sooner with a runtime drop-in.

Run from the repository root:
``pyinfra tests/bench/schedule_inventory.py deploys/schedule.py --limit pis``.
"""

from typing import Any

from tests.bench import fleet as _fleet
from tests.bench import inventory as _bench
from tests.bench import sops as _sops
from tests.bench import systemd_host as _systemd_host
from tests.bench.client import BENCH_INVENTORY as _INVENTORY

STATE_DIR = "/var/lib/nixpush"


def _schedule(name: str) -> dict[str, Any]:
    return {
        "enabled": True,
        "checkout": str(_systemd_host.runner_checkout(_fleet.BENCH_DIR)),
        "program": str(_systemd_host.runner_venv(_fleet.BENCH_DIR) / "bin" / "nixpush-run"),
        "user": "root",
        "age_key_file": str(_sops.AGE_KEY_FILE),
        "inventory": _INVENTORY,
        "state_dir": STATE_DIR,
        "keep": 5,
        "wait": 60,
        "runs": {"check": {"on_calendar": "hourly", "limit": [name]}},
    }


def _scheduled(members: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    systemd = {h.name for h in _fleet.HOSTS if h.systemd}
    return [
        (name, {**data, "schedule": _schedule(name)} if name in systemd else data)
        for name, data in members
    ]


minimal = _scheduled(_bench.minimal)
common = _scheduled(_bench.common)
network = _scheduled(_bench.network)
main = _scheduled(_bench.main)
server = _scheduled(_bench.server)
