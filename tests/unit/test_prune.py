"""Generations kept: the program's answer read, the line the step reports, the command, and
the program run for real by sh against a stand-in profile."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from operations.push import prune


def test_the_answer_names_what_went_what_stayed_and_what_was_freed():
    lines = [
        "nixpush-kept 3 (booted)",
        "nixpush-doomed 2 1",
        "nixpush-gc 12 store paths deleted, 48.20 MiB freed",
    ]
    pruned = prune.parse_pruned(lines)
    assert pruned == prune.Pruned(("2", "1"), ("3 (booted)",), lines[2][11:], None, True)
    assert prune.describe(pruned, 3, dry=False) == (
        "keep_generations 3: deleted system generations 2 1 (kept besides: 3 (booted)); "
        "garbage collection: 12 store paths deleted, 48.20 MiB freed"
    )
    alone = prune.parse_pruned(["nixpush-doomed 4"])
    assert (
        prune.describe(alone, 2, dry=True) == "keep_generations 2: would delete system generation 4"
    )
    assert prune.describe(alone, 2, dry=False).endswith(
        "their store paths stay until a garbage collection (gc_after_deploy)"
    )
    assert prune.describe(prune.parse_pruned(["nixpush-doomed"]), 5, dry=False) == (
        "keep_generations 5: no system generation to delete"
    )
    assert not prune.parse_pruned(["error: lost"]).complete
    assert prune.parse_pruned(["nixpush-busy id=abc"]).busy == "id=abc"


def test_the_command_passes_only_numbers_and_a_quoted_mode():
    command = prune.prune_command("dry", 3, True).get_raw_value()
    assert command == "sh -s -- dry 3 1"


@pytest.mark.parametrize("keep", [2, 3])
def test_the_program_keeps_the_newest_the_profiles_the_booted_and_the_running(tmp_path, keep):
    """prune.sh in dry mode (nothing deleted, no lock) against a stand-in profile directory:
    its paths rewritten to the temporary directory."""
    profiles, run = tmp_path / "profiles", tmp_path / "run"
    profiles.mkdir()
    run.mkdir()
    for number in range(1, 8):
        system = tmp_path / f"system{number}"
        system.mkdir()
        (profiles / f"system-{number}-link").symlink_to(system)
    (profiles / "system").symlink_to("system-7-link")
    (run / "booted-system").symlink_to(tmp_path / "system2")
    (run / "current-system").symlink_to(tmp_path / "system4")
    program = (
        prune.PROGRAM.replace("/nix/var/nix/profiles", str(profiles))
        .replace("/run/booted-system", str(run / "booted-system"))
        .replace("/run/current-system", str(run / "current-system"))
    )
    result = subprocess.run(
        ["sh", "-s", "--", "dry", str(keep + 1), "0"], input=program,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pruned = prune.parse_pruned(result.stdout.splitlines())
    # dry keeps one fewer: the switch to come adds one.
    newest = set(range(8 - keep, 8))
    assert set(map(int, pruned.doomed)) == set(range(1, 8)) - newest - {2, 4}
    assert "2 (booted)" in pruned.kept and "4 (running)" in pruned.kept
    assert Path(profiles / "system-1-link").is_symlink()  # dry: nothing deleted
