"""
check_fleet on the bench: an inventory with a builder cycle or two targets at one address is
refused by ``pyinfra ... deploys/pi.py`` before any operation runs, and no host changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench.client import on_host, pyinfra
from tests.bench.sops import env as sops_env
from tests.e2e.test_secrets import overlay_inventory

DEPLOY = "deploys/pi.py"


@pytest.fixture(scope="module")
def ready(push_ready: None) -> None:
    """The session's push preparation (``push_ready``, tests/conftest.py)."""


def host_states() -> dict[str, tuple[str, str]]:
    """Each Pi's current system and its builder's known_hosts: what a deploy would change."""
    states = {}
    for pi in fleet.PIS:
        current = on_host(pi.name).run("readlink /run/current-system || true").stdout.strip()
        states[pi.name] = (current, "")
    known = on_host(fleet.BUILDER).file("/root/.nixpush/known_hosts")
    states[fleet.BUILDER] = ("", known.sha256sum if known.exists else "missing")
    return states


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"pi5": {"ssh_hostname": fleet.host("pi4").ip, "ssh_port": fleet.host("pi4").port}},
            f"pi5: ssh_hostname and ssh_port {fleet.host('pi4').ip}:{fleet.host('pi4').port} are "
            "also pi4's, and the builder's known_hosts holds one host key per address; give "
            "each target its own address or port",
        ),
        (
            {fleet.BUILDER: {"builder_host": "pi4"}},
            f"pi4: builder_host '{fleet.BUILDER}' has builder_host 'pi4': two hosts that build "
            "each other are never built",
        ),
        (
            {"pi5": {"builder_host": "pi4"}},
            f"pi5: builder_host 'pi4' is itself built on '{fleet.BUILDER}', a chain nixpush "
            "does not follow",
        ),
    ],
    ids=["shared-address", "cycle", "chain"],
)
def test_broken_builders_are_refused_before_any_host_changes(
    ready: None, tmp_path: Path, extra: dict[str, dict[str, object]], expected: str
) -> None:
    before = host_states()
    result = pyinfra("-y", overlay_inventory(tmp_path, extra), DEPLOY, env=sops_env())
    output = result.stdout + result.stderr

    assert result.returncode != 0
    assert "the inventory has" in output and expected in output, output[-3000:]
    assert "Starting operation" not in output and "Traceback" not in output
    assert host_states() == before
