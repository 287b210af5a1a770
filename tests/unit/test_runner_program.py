"""The installed ``nixpush-run`` program, as a timer starts it: exit codes and help through the
console script (needs no bench: nothing here reaches a host)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.conftest import REPO

RUNNER = Path(sys.executable).with_name("nixpush-run")
INVENTORY = "tests/bench/inventory.py"


def nixpush_run(mode: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``nixpush-run`` from the checkout with stdin closed, as a timer runs it."""
    return subprocess.run(
        [str(RUNNER), mode, "--inventory", INVENTORY, "--state-dir", str(state_dir), *args],
        cwd=REPO, text=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_usage_errors_exit_64(tmp_path):
    state_dir = tmp_path / "state"
    assert nixpush_run("sometimes", state_dir).returncode == 64
    assert nixpush_run("check", state_dir, "--inventory", "missing.py").returncode == 64
    assert nixpush_run("check", state_dir, "--keep", "0").returncode == 64
    helped = nixpush_run("check", state_dir, "--help")
    assert helped.returncode == 0
    for code in ("0 ", "1 ", "2 ", "64", "75"):
        assert f"\n  {code}" in helped.stdout
