"""The bench fleet with the NAS's builder pool: the member ``bld`` (``up --pool``) builds
aarch64 for the NAS through Nix's build hook (``deploys/nas.py`` prepares both ends).

The same hosts and data as ``tests/bench/inventory.py``, plus ``bld`` (no push target: it only
builds) and, on the NAS, ``remote_builders`` and its pool client key in ``secrets`` (sops key
``ssh/nas_pool``). A separate file, so runs of the plain bench inventory keep building
everything on the NAS.

Knobs, read from the environment when pyinfra loads this file (tests set them per run):
``NIXPUSH_BENCH_NAS_MAX_JOBS`` (the NAS's ``nix_max_jobs``; 0 makes the pool the only way to
build), ``NIXPUSH_BENCH_POOL_SPEED`` (the member's ``speed_factor``, default 4).

Run from the repository root: ``pyinfra tests/bench/pool_inventory.py deploys/nas.py``.
"""

import os as _os

from operations.trust.keys import POOL_KEY_PATH as _KEY_PATH
from tests.bench import fleet as _fleet
from tests.bench import inventory as _bench
from tests.bench import sops as _sops

_NAS: dict[str, object] = {
    "remote_builders": [h.name for h in _fleet.POOL],
    "secrets": [
        {"key": "headscale/pre_auth", "dest": "/run/secrets/headscale-pre-auth"},
        {"key": _sops.POOL_KEY, "dest": _KEY_PATH, "mode": "0600"},
    ],
}
if "NIXPUSH_BENCH_NAS_MAX_JOBS" in _os.environ:
    _NAS["nix_max_jobs"] = int(_os.environ["NIXPUSH_BENCH_NAS_MAX_JOBS"])


def _member(h: _fleet.BenchHost) -> tuple[str, dict[str, object]]:
    data = _bench._data(h)
    # It builds for the NAS and is deployed by nobody; no Tailscale key either.
    for key in ("builder_host", "secrets", "flake"):
        data.pop(key, None)
    data.update(
        nix_max_jobs=1,
        speed_factor=int(_os.environ.get("NIXPUSH_BENCH_POOL_SPEED", "4")),
        builder_features=["big-parallel"],
    )
    return h.name, data


minimal = [*_bench._overlay(_bench.minimal, {_fleet.BUILDER: _NAS}), *map(_member, _fleet.POOL)]
common = _bench._overlay(_bench.common, {_fleet.BUILDER: _NAS})
network = _bench._overlay(_bench.network, {_fleet.BUILDER: _NAS})
main = _bench._overlay(_bench.main, {_fleet.BUILDER: _NAS})
work = _bench.work
server = _bench._overlay(_bench.server, {_fleet.BUILDER: _NAS})
