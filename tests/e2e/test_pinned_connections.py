"""
Pinned connections, end to end on the bench: the controller's own connections
pinned to the inventory's host keys (operations/trust/hostkeys.py: with no known_hosts file and no
strict checking in the data, a bench host with ``ssh_host_key`` is reached only when it answers
with that key, and nothing is accepted on first contact), and no Nix access token in pyinfra's
debug output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench.client import BENCH_INVENTORY, pyinfra, ssh
from tests.e2e.test_pi import output

PI = fleet.PIS[0].name
# A well-formed ed25519 key that no bench host has.
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDhT8yrRU+3V2oxL5d3S9E2gDxNgUOsLCs8D3Zc5Lz+x"


def pinned_inventory(tmp_path: Path, pi_key: str | None = None) -> str:
    """The bench inventory without its known_hosts file and strict checking, pinned by
    ``pin_host_keys`` (``pi_key`` replaces the Pi's ``ssh_host_key``)."""
    inventory = tmp_path / "pinned.py"
    inventory.write_text(
        "from operations.trust.hostkeys import pin_host_keys\n"
        "from tests.bench import inventory as _bench\n"
        "_DROPPED = ('ssh_known_hosts_file', 'ssh_strict_host_key_checking')\n"
        f"_PI, _KEY = {PI!r}, {pi_key!r}\n"
        "def _pinned(members):\n"
        "    bare = [(n, {k: v for k, v in d.items() if k not in _DROPPED}) for n, d in members]\n"
        "    return pin_host_keys(\n"
        "        [(n, {**d, 'ssh_host_key': _KEY} if n == _PI and _KEY else d) for n, d in bare]\n"
        "    )\n"
        "minimal, common, network = (_pinned(m) for m in (_bench.minimal, _bench.common,\n"
        "                                                  _bench.network))\n"
        "main, work, server = (_pinned(m) for m in (_bench.main, _bench.work, _bench.server))\n"
    )
    return str(inventory)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose HOME has no known_hosts: what pyinfra would otherwise use."""
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    return {**os.environ, "HOME": str(tmp_path / "home")}


def test_a_host_is_reached_by_its_pinned_key_with_no_known_hosts_file(bench, tmp_path, home):
    result = pyinfra(
        "-y", "--limit", PI, pinned_inventory(tmp_path), "exec", "--", "true", env=home
    )

    assert result.returncode == 0, output(result)
    assert "Added host key" not in output(result)
    assert not (Path(home["HOME"]) / ".ssh" / "known_hosts").exists()  # nothing accepted


def test_a_host_answering_with_another_key_is_refused(bench, tmp_path, home):
    inventory = pinned_inventory(tmp_path, pi_key=OTHER_KEY)

    result = pyinfra("-y", "--limit", PI, inventory, "exec", "--", "true", env=home)

    text = output(result)
    assert result.returncode != 0, text
    assert "SSH host key error" in text and "does not match" in text
    assert not (Path(home["HOME"]) / ".ssh" / "known_hosts").exists()


# -- no access token in debug output -----------------------------------------------------

TOKEN = "ghp_S3CRETbench0123456789"


@pytest.fixture
def nas_with_a_token(bench: None) -> object:
    """The NAS's nix.conf with a GitHub access token, as an owner's flake fetches need."""
    nas = fleet.BUILDER
    ssh(nas, f"echo 'access-tokens = github.com={TOKEN}' >> /etc/nix/nix.conf")
    yield nas
    ssh(nas, "sed -i '/^access-tokens = /d' /etc/nix/nix.conf")


def test_no_access_token_reaches_pyinfras_debug_output(nas_with_a_token):
    nas = nas_with_a_token
    assert TOKEN in ssh(nas, "nix --extra-experimental-features nix-command show-config").stdout

    result = pyinfra(
        "--dry", "-vvv", "--debug-facts", "--limit", nas, BENCH_INVENTORY, "deploys/nas.py"
    )

    text = output(result)
    assert result.returncode == 0, text
    assert "show-config --json" in text  # the Nix settings were read, and printed
    assert TOKEN not in text
