"""The owner's inventory (the repository's ``inventory.py``) on the bench: the same hosts, roots
and data, only the addresses, accounts and files made the bench's.

- ``nas``: the bench NAS (builds for the others and itself); the test marks it NixOS;
- ``pi4``: the bench pi4 (port 8023, ``beau``), its ``ssh_host_key`` filled in (the checklist's
  step 5);
- ``grill``: the bench desktop ``pc1`` (x86_64, ``beau``), up but not set up: no
  ``ssh_host_key``, no fragment applied;
- ``laptop``: an address nothing answers on (down), ``offline_ok`` as the owner's.

With ``NIXPUSH_BENCH_OWNER_LATER=1`` in the environment, grill and laptop have their
``ssh_host_key`` too: the checklist's later step, which adds them. The schedule is shipped
disabled; ``NIXPUSH_BENCH_OWNER_SCHEDULE=1`` enables it (the checklist's step 9).

The roots' data is the shipped ``group_data/`` (pyinfra reads it from the directory it runs in),
except what the bench cannot have: health checks of services it does not run, and the
schedule's paths (``SCHEDULE``, the shipped runs with the bench's checkout and age key).

Run from the repository root: ``pyinfra tests/bench/nixos_owner_inventory.py deploys/pi.py``.
"""

import os as _os
import runpy as _runpy
from typing import Any as _Any

from tests.bench import fleet as _fleet
from tests.bench import sops as _sops

FRAGMENTS_DIR = _fleet.BENCH_DIR / "owner-fragments"
OWN_SOPS_FILE = _sops.SOPS_DIR / "nixpush-secrets.yaml"
# Where nothing answers: the laptop is asleep.
LAPTOP_ADDRESS = f"{_fleet.SUBNET}.99"
# A made-up ed25519 host key for the laptop that never answers (the later step sets one).
LAPTOP_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOHz+U0YtjINc54dZiJNclfmEFifF7RXCFlNlTbuZBji"
LATER = _os.environ.get("NIXPUSH_BENCH_OWNER_LATER") == "1"
# With NIXPUSH_BENCH_OWNER_DOWN=1 every host is down (an address nothing answers on).
DOWN = _os.environ.get("NIXPUSH_BENCH_OWNER_DOWN") == "1"

_SHIPPED = _runpy.run_path(str(_fleet.REPO / "inventory.py"))
_SERVER = _runpy.run_path(str(_fleet.REPO / "group_data" / "server.py"))
# Owner host -> the bench host standing in for it (the laptop has none: it is down).
_STAND_IN = {"nas": "nas", "pi4": "pi4", "grill": "pc1"}

SCHEDULED = _os.environ.get("NIXPUSH_BENCH_OWNER_SCHEDULE") == "1"
# The shipped schedule with the bench's checkout and age key (and the runs as shipped), enabled
# from step 9 on; no program, as the owner's NixOS data has none.
SCHEDULE = {
    **_SERVER["schedule"],
    "enabled": SCHEDULED,
    "checkout": str(_fleet.REPO),
    "user": "root",
    "age_key_file": str(_sops.AGE_KEY_FILE),
    "inventory": "tests/bench/nixos_owner_inventory.py",
}


def _host_key(name: str) -> str:
    path = _fleet.host(name).dir / "ssh" / "ssh_host_ed25519_key.pub"
    return " ".join(path.read_text().split()[:2])


def _data(name: str, shipped: dict[str, _Any]) -> dict[str, _Any]:
    data = {**_SHIPPED["_FLEET_WIDE"], **shipped["data"]}
    data.update(
        flake=_fleet.flake_ref(),
        sops_file=str(_sops.SECRETS_FILE),
        # nixpush's own keys in a file of their own (tests/bench/nixos_sops.py writes it);
        # NIXPUSH_BENCH_OWNER_SOPS names another (one a pushed host can decrypt, say).
        nixpush_sops_file=_os.environ.get("NIXPUSH_BENCH_OWNER_SOPS", str(OWN_SOPS_FILE)),
        nixos_fragments_dir=str(FRAGMENTS_DIR),
        ssh_key=str(_fleet.BENCH_DIR / "id_ed25519"),
        ssh_known_hosts_file=str(_fleet.BENCH_DIR / "known_hosts"),
        # The hosts share the machine's /var: each records what nixpush deployed in its own /nix.
        provenance_file="/nix/var/nixpush/deployed.json",
        # The bench runs neither Syncthing nor a tailnet (group_data/main.py, network.py).
        health_checks=[
            # Timed like the shipped checks they stand for: within the confirmation window.
            {"name": "syncthing", "command": "true", "timeout": 3, "retries": 1},
            {"name": "tailscaled", "command": "true", "timeout": 3, "retries": 1},
        ],
    )
    if name == "nas":
        data["schedule"] = SCHEDULE
    stand_in = None if DOWN else _STAND_IN.get(name)
    if stand_in is None:  # the laptop (or, with DOWN, every host): down
        data.update(ssh_hostname=LAPTOP_ADDRESS, ssh_port=22, nixos_config="pc1")
        if DOWN:  # each its own address (targets may not share one)
            data["ssh_hostname"] = f"{_fleet.SUBNET}.{90 + list(_SHIPPED['_FLEET']).index(name)}"
        if LATER:
            data["ssh_host_key"] = LAPTOP_HOST_KEY
        return data
    h = _fleet.host(stand_in)
    data.update(ssh_hostname=h.ip, ssh_port=h.port, ssh_user=h.user, nixos_config=h.name)
    if h.user == "root":
        data.pop("_sudo", None)
    if name == "pi4" or (name == "grill" and LATER):
        data["ssh_host_key"] = _host_key(stand_in)
    return data


def _members(root: str) -> list[tuple[str, dict[str, _Any]]]:
    return [
        (name, _data(name, host))
        for name, host in _SHIPPED["_FLEET"].items()
        if root in host["roots"]
    ]


minimal = _members("minimal")
common = _members("common")
network = _members("network")
main = _members("main")
work = _members("work")
gaming = _members("gaming")
server = _members("server")
