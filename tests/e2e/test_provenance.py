"""
Who deployed what: after a confirmed switch the target records it in a root-only
``/var/lib/nixpush/deployed.json``; a check (``--dry``, what ``nixpush-run check`` runs)
reports a host switched by hand since (``fleet.manual_switch``, a ``nixos-rebuild switch``
without nixpush) as ``changed outside nixpush``, apart from drift from the flake; the report
carries the deploy's revision.
"""

from __future__ import annotations

import json
import socket

from operations.push import provenance
from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, pyinfra
from tests.e2e.test_pi import current, output
from tests.e2e.test_safe import FAST, PI, configure, deploy

# The bench's hosts share the machine's /var: its inventory keeps each record in the host's /nix.
RECORD = "/nix/var/nixpush/deployed.json"


def in_pi4(*argv: str) -> str:
    return fleet.run(fleet.in_host(fleet.host("pi4"), list(argv))).stdout.strip()


def check(tmp_path, name: str):
    """A check of pi4 (pyinfra --dry), with its report."""
    path = tmp_path / name
    env = {**bench_sops.env(), "NIXPUSH_REPORT_FILE": str(path)}
    result = pyinfra(BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", env=env)
    return result, json.loads(path.read_text())["hosts"]["pi4"]


def test_a_switch_is_recorded_and_a_switch_by_hand_is_reported_by_a_check(push_ready, tmp_path):
    wanted = configure("pi4")
    result = deploy("--limit", "pi4", *FAST, env={"NIXPUSH_REPORT_FILE": str(tmp_path / "d")})
    assert result.returncode == 0, output(result)
    assert current("pi4") == wanted

    # The record: root's alone, whole, naming the system, its flake and revision, nixpush's
    # revision, this controller, the time and the action.
    assert in_pi4("stat", "-c", "%a %U", "/nix/var/nixpush") == "700 root"
    assert in_pi4("stat", "-c", "%a %U", RECORD) == "600 root"
    assert in_pi4("ls", "-a", "/nix/var/nixpush").split() == [".", "..", "deployed.json"]
    record = json.loads(in_pi4("cat", RECORD))
    assert record["system"] == wanted and record["action"] == "switch"
    assert record["flake"] == fleet.flake_ref() and record["configuration"] == "pi4"
    assert record["flake_nar_hash"].startswith("sha256-")  # a path: flake has no git revision
    assert record["nixpush_revision"] and record["controller"] == socket.gethostname()
    assert record["time"].endswith("+00:00")
    # The deploy's report carries the revision it deployed.
    report = json.loads((tmp_path / "d").read_text())["hosts"]["pi4"]
    assert report["revision"] == provenance.flake_revision(
        {"revision": record["flake_revision"], "narHash": record["flake_nar_hash"]}
    )

    # A check right after: nothing to report.
    result, entry = check(tmp_path, "c1")
    assert result.returncode == 0, output(result)
    assert "changed outside nixpush" not in output(result), output(result)
    assert entry["status"] == "unchanged"

    # A newer system set as the boot default only (boot leaves no record), then switched to by
    # hand: the host runs what the flake says, but not what nixpush deployed there.
    newer = configure("pi4")
    result = deploy("--limit", "pi4", *FAST, "--data", "deploy_action=boot")
    assert result.returncode == 0, output(result)
    assert json.loads(in_pi4("cat", RECORD))["system"] == wanted
    fleet.manual_switch(fleet.host("pi4"), newer)
    assert current("pi4") == newer
    finding = f"changed outside nixpush: runs {newer}, nixpush deployed {wanted}"
    result, entry = check(tmp_path, "c2")
    text = output(result)
    assert f"pi4: drifted: {finding}" in text, text
    assert f"[pi4] {finding}" in text, text
    assert entry["status"] == "drifted" and entry["cause"].startswith(finding)

    # Switched by hand to another system than the flake's: both kinds of drift, told apart.
    fleet.manual_switch(fleet.host("pi4"), wanted)
    result, entry = check(tmp_path, "c3")
    assert "changed outside nixpush" not in output(result), output(result)
    assert entry["status"] == "planned"  # the flake wants `newer`: drift from the flake only

    # nixpush deploys again: the record follows, and the check is quiet.
    result = deploy("--limit", "pi4", *FAST)
    assert result.returncode == 0, output(result)
    assert json.loads(in_pi4("cat", RECORD))["system"] == newer
    result, entry = check(tmp_path, "c4")
    assert "changed outside nixpush" not in output(result), output(result)
    assert entry["status"] == "unchanged"
