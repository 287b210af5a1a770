"""Generations kept: the program's answer read, the line the step reports, the command, and
the program run for real by sh against a stand-in profile."""

from __future__ import annotations

import os
import shutil
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
    result = subprocess.run(
        ["sh", "-s", "--", "dry", str(keep + 1), "0"], input=prune.PROGRAM,
        capture_output=True, text=True, check=True, env={**os.environ, **paths_env(tmp_path)},
    )  # fmt: skip
    pruned = prune.parse_pruned(result.stdout.splitlines())
    # dry keeps one fewer: the switch to come adds one.
    newest = set(range(8 - keep, 8))
    assert set(map(int, pruned.doomed)) == set(range(1, 8)) - newest - {2, 4}
    assert "2 (booted)" in pruned.kept and "4 (running)" in pruned.kept
    assert Path(profiles / "system-1-link").is_symlink()  # dry: nothing deleted


def paths_env(root: Path) -> dict[str, str]:
    """prune.sh's fixed paths (profile, booted and running links, run directories) moved into
    ``root``, as ``_stand_in_host`` lays them out."""
    return {
        "NIXPUSH_PROFILE": str(root / "profiles" / "system"),
        "NIXPUSH_BOOTED": str(root / "run" / "booted-system"),
        "NIXPUSH_RUNNING": str(root / "run" / "current-system"),
        "NIXPUSH_RUNS": str(root / "run" / "nixpush"),
    }


SHELLS = [shell for shell in ("dash", "bash") if shutil.which(shell)]


def _stand_in_host(tmp_path: Path, generations: int, booted: int) -> tuple[str, Path]:
    """A profile with generations 1 to ``generations`` (the newest the profile's and the running
    one), a booted system, the lock under the temporary directory, and a ``nix-env`` on PATH
    that records what it was asked to delete: prune.sh with its paths rewritten, and the log."""
    profiles, run, stubs = tmp_path / "profiles", tmp_path / "run", tmp_path / "bin"
    for directory in (profiles, run, stubs):
        directory.mkdir(exist_ok=True)
    for number in range(1, generations + 1):
        (tmp_path / f"system{number}").mkdir(exist_ok=True)
        link = profiles / f"system-{number}-link"
        if not link.is_symlink():
            link.symlink_to(tmp_path / f"system{number}")
    for name, target in (
        (profiles / "system", f"system-{generations}-link"),
        (run / "booted-system", str(tmp_path / f"system{booted}")),
        (run / "current-system", str(tmp_path / f"system{generations}")),
    ):
        name.unlink(missing_ok=True)
        name.symlink_to(target)
    log = tmp_path / "deleted"
    log.write_text("")
    nix_env = stubs / "nix-env"
    nix_env.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    nix_env.chmod(0o755)
    return prune.PROGRAM, log


def _run(shell: str, program: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", **paths_env(tmp_path)}
    return subprocess.run(
        [shell, "-s", "--", *args], input=program, capture_output=True, text=True, env=env,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("keep", [2, 3, 6, 1000, prune.KEEP_ALL])
def test_dry_and_the_real_run_delete_the_same_generations_in_every_shell(tmp_path, shell, keep):
    """--dry before the switch (generations 1 to 7) names what the run after it (8 added, the
    profile's and running) deletes; the booted generation 2 stays either way."""
    program, log = _stand_in_host(tmp_path, 7, booted=2)
    dry = _run(shell, program, tmp_path, "dry", str(keep), "0")
    assert dry.returncode == 0, dry.stderr
    would = prune.parse_pruned(dry.stdout.splitlines())
    assert log.read_text() == ""  # dry: nix-env never runs
    program, log = _stand_in_host(tmp_path, 8, booted=2)
    real = _run(shell, program, tmp_path, "prune", str(keep), "0")
    assert real.returncode == 0, real.stderr
    went = prune.parse_pruned(real.stdout.splitlines())
    assert would.complete and went.complete
    assert went.doomed == would.doomed
    assert set(map(int, went.doomed)) == set(range(1, 9 - keep)) - {2}
    deleted = log.read_text().split()
    wanted = ["--delete-generations", *went.doomed] if went.doomed else []
    assert [word for word in deleted if not word.startswith(("-p", "/"))] == wanted


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "keep", [str(2**63), str(2**64), "99999999999", "0", "08", "-1", "", "3 ", "1e3", "$(id)"]
)
def test_a_keep_that_is_not_a_plain_number_deletes_nothing_in_either_mode(tmp_path, shell, keep):
    """Numbers past sh's (2^63: dash, bash and busybox disagree on it), octal-looking and
    other text: refused before any generation is read, dry or not."""
    program, log = _stand_in_host(tmp_path, 8, booted=2)
    for mode in ("dry", "prune"):
        result = _run(shell, program, tmp_path, mode, keep, "0")
        assert result.returncode == 2, (mode, result.stdout, result.stderr)
        assert "not a number from 1 to 9999999999" in result.stderr
        assert "nixpush-doomed" not in result.stdout
    assert log.read_text() == ""
    assert len(list((tmp_path / "profiles").glob("system-*-link"))) == 8


def test_the_command_refuses_a_keep_out_of_range():
    for keep in (0, -1, prune.KEEP_ALL + 1, 2**63):
        with pytest.raises(ValueError, match="keep is"):
            prune.prune_command("prune", keep, False)
