"""
Hosts with several addresses (``ssh_hostname`` a list): the bench inventory lists every host's
two addresses with ``NIXPUSH_BENCH_ADDRESSES=1`` (the second a stand-in for its tailnet
address). Before pyinfra connects, the first that answers is chosen; the builder pushes to it
with the same pinned key; a host answering on none is ``could not connect (tried a, b)``, or
``offline`` with ``offline_ok``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, pyinfra
from tests.e2e.test_pi import output
from tests.e2e.test_safe import FAST, configure, deploy

SEVERAL = {"NIXPUSH_BENCH_ADDRESSES": "1"}


@pytest.fixture
def listed(push_ready: None) -> Iterator[fleet.BenchHost]:
    """pi4 with both its addresses in the inventory, the builder knowing its key at both (as
    the owner runs deploys/secrets.py after adding an address); pi4 given back its first
    address and its link afterwards."""
    result = pyinfra(
        "-y", BENCH_INVENTORY, "deploys/secrets.py", env={**bench_sops.env(), **SEVERAL}
    )
    assert result.returncode == 0, output(result)
    h = fleet.host("pi4")
    yield h
    fleet.set_link(h, up=True)
    fleet.drop_address(h, dropped=False)


def test_the_first_address_that_answers_is_used_by_pyinfra_and_the_builder(listed, tmp_path):
    h = listed
    assert h.second_ip is not None
    fleet.drop_address(h)  # away from the LAN: only the "tailnet" address answers
    wanted = configure("pi4")
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = deploy("--limit", "pi4", *FAST, env={**SEVERAL, "NIXPUSH_REPORT_FILE": str(report)})
    text = output(result)
    assert result.returncode == 0, text
    (line,) = [line for line in text.splitlines() if line.strip().startswith("pi4: ")]
    assert line.strip().startswith(f"pi4: deployed: switch {wanted}"), text
    assert line.endswith(f"; via {h.second_ip}"), text
    # The builder pushed to the same address (the first one is gone), checking the same key.
    assert f"[pi4] copied {wanted} from nas" in text, text
    running = fleet.run(fleet.in_host(h, ["readlink", "-f", "/run/current-system"]))
    assert running.stdout.strip() == wanted
    assert json.loads(report.read_text())["hosts"]["pi4"]["address"] == h.second_ip
    assert time.monotonic() - started < 120

    # Back home: the first address again, and nothing said about it.
    fleet.drop_address(h, dropped=False)
    result = deploy("--limit", "pi4", *FAST, env=SEVERAL)
    text = output(result)
    assert result.returncode == 0, text
    assert "pi4: unchanged" in text and "via" not in text, text


def test_a_host_answering_on_no_address_names_them_all_or_is_offline(listed):
    h = listed
    assert h.second_ip is not None
    fleet.set_link(h, up=False)  # off: neither address answers
    # pi5 in the run too: pyinfra stops a run in which no host connected before nixpush's code.
    limit = ("--limit", "pi4", "--limit", "pi5")
    started = time.monotonic()
    result = deploy(*limit, *FAST, env=SEVERAL)
    probed = time.monotonic() - started
    text = output(result)
    assert result.returncode != 0, text
    assert f"pi4: failed: could not connect (tried {h.ip}, {h.second_ip})" in text, text
    assert "pi5: unchanged" in text or "pi5: deployed" in text, text
    assert probed < 120, probed

    result = deploy(*limit, *FAST, "--data", "offline_ok=true", env=SEVERAL)
    text = output(result)
    assert result.returncode == 0, text
    assert "pi4: offline: unreachable, and offline_ok" in text, text
