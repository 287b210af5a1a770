"""The bench fleet as a nixpush inventory: the same data contract as the repo's inventory.py.

Run from the repository root, e.g. ``pyinfra tests/bench/inventory.py deploys/pi.py``.
The bench must be up (``python -m tests.bench up``); its hosts are the fleet ``up`` recorded
(``--pis N``).
"""

# Module-level lists are groups to pyinfra: keep helpers behind underscores.
import os as _os
from collections.abc import Mapping as _Mapping

from operations.trust.hostkeys import choose_addresses as _choose_addresses
from tests.bench import fleet as _fleet
from tests.bench import sops as _sops
from tests.bench import systemd_host as _systemd_host


def _data(h: _fleet.BenchHost) -> dict[str, object]:
    # NIXPUSH_BENCH_ADDRESSES=1: every host with a second address (a stand-in for its tailnet
    # address) lists both, tried in order (fleet.drop_address takes the first away).
    several = _os.environ.get("NIXPUSH_BENCH_ADDRESSES") == "1" and h.second_ip is not None
    data: dict[str, object] = {
        "ssh_hostname": list(h.ips) if several else h.ip,
        "ssh_port": h.port,
        "ssh_user": h.user,
        "ssh_key": str(_fleet.BENCH_DIR / "id_ed25519"),
        "ssh_known_hosts_file": str(_fleet.BENCH_DIR / "known_hosts"),
        "ssh_strict_host_key_checking": "yes",
        "nix_system": h.system,
        "flake": _fleet.flake_ref(),
        # The bench's test-only secrets, encrypted to the bench's age key (tests/bench/sops.py).
        "sops_file": str(_sops.SECRETS_FILE),
        # Debian hosts without sops-nix: nixpush installs their Tailscale pre-auth key (the
        # owner's NixOS hosts get theirs from sops-nix: group_data/network.py has none).
        "secrets": [{"key": "headscale/pre_auth", "dest": "/run/secrets/headscale-pre-auth"}],
    }
    if h.user != "root":
        data["_sudo"] = True
    # Never the real reboot: the bench's stand-in ends the host's namespaces and starts it
    # again (tests/bench/standins/reboot.sh); the hosts lack CAP_SYS_BOOT besides.
    data["reboot_command"] = [str(_fleet.REBOOT_STAND_IN)]
    # The hosts share the machine's /var (each has its own /nix): each keeps its record of what
    # nixpush deployed in its own store's state directory.
    data["provenance_file"] = "/nix/var/nixpush/deployed.json"
    # Every host is built on the NAS, the NAS itself included (it deploys itself: nothing is
    # copied). Push only; tests/bench/pull_inventory.py adds builder_user (pull builds).
    data.update(builder_host=_fleet.BUILDER)
    emulated = sorted({pi.system for pi in _fleet.PIS})
    if h.name == _fleet.BUILDER and emulated != ["aarch64-linux"]:
        # Host data beats group_data/server.py's ["aarch64-linux"]: a fleet with armv7l Pis
        # needs its builder to emulate armv7l too (deploys/nas.py sets it up).
        data["binfmt_emulated_systems"] = emulated
    checks: list[dict[str, object]] = []
    if h.systemd:
        # The roots' unit checks (group_data/) as this bench host has them: its sshd is a unit
        # of the bench's own, and the bench has no tailnet. Host data replaces checks by name.
        # Their worst case fits in the 10 s confirm_timeout tests use (6 + 2 + 1 s).
        checks += [
            {"name": "sshd", "units": [_systemd_host.SSHD_UNIT], "timeout": 2, "retries": 1},
            {"name": "nix-daemon", "units": ["nix-daemon.socket"], "timeout": 2, "retries": 0},
            {"name": "tailscaled", "command": "true", "timeout": 1, "retries": 0},
        ]
    if "main" in h.roots:
        # group_data/main.py checks Syncthing's health URL; the bench runs no Syncthing.
        checks.append({"name": "syncthing", "command": "true", "timeout": 1, "retries": 0})
    if checks:
        data["health_checks"] = checks
    host_key = h.dir / "ssh" / "ssh_host_ed25519_key.pub"
    if host_key.exists():
        data["ssh_host_key"] = " ".join(host_key.read_text().split()[:2])
    return data


def _members(root: str) -> list[tuple[str, dict[str, object]]]:
    # The NAS's pool member (``up --pool``) is in tests/bench/pool_inventory.py only: runs of
    # this inventory stay what they were.
    return _choose_addresses(
        [(h.name, _data(h)) for h in _fleet.HOSTS if root in h.roots and not h.pool_member]
    )


def _overlay(
    members: list[tuple[str, dict[str, object]]], extra: _Mapping[str, _Mapping[str, object]]
) -> list[tuple[str, dict[str, object]]]:
    """``members`` with ``extra[name]`` added to the data of each host it names.

    For inventories built on this one (tests/bench/pull_inventory.py, the perf harness).
    """
    return [(name, {**data, **extra.get(name, {})}) for name, data in members]


minimal = _members("minimal")
common = _members("common")
network = _members("network")
main = _members("main")
work = _members("work")
server = _members("server")
