"""The evaluation cache: what names a flake state, what is kept, and that a broken or
unwritable cache only costs an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operations.push import evalcache
from operations.push.commands import Evaluated

META = {
    "locked": {"narHash": "sha256-AAAA", "type": "path", "path": "/f"},
    "locks": {"nodes": {"root": {}}, "root": "root", "version": 7},
}
PI4 = Evaluated("/nix/store/aaa-nixos-system-pi4", "/nix/store/bbb-nixos-system-pi4.drv")


def test_a_flake_state_is_its_locked_source_and_every_input_lock():
    key = evalcache.fingerprint("path:/f", META)
    assert key == evalcache.fingerprint("path:/f", json.loads(json.dumps(META)))
    other_source = {**META, "locked": {**META["locked"], "narHash": "sha256-BBBB"}}
    other_input = {**META, "locks": {"nodes": {"root": {"inputs": {"nixpkgs": "n"}}}}}
    assert key is not None
    assert evalcache.fingerprint("path:/f", other_source) != key
    assert evalcache.fingerprint("path:/f", other_input) != key
    assert evalcache.fingerprint("path:/g", META) != key


@pytest.mark.parametrize(
    "metadata", [{}, {"locked": {}}, {"locked": {"narHash": ""}}, {"locked": 3}]
)
def test_a_flake_nix_cannot_lock_is_never_remembered(metadata):
    assert evalcache.fingerprint("path:/f", metadata) is None


def test_answers_are_kept_per_flake_state_and_errors_are_not(tmp_path):
    cache = tmp_path / "nixpush" / "evaluations.json"
    evalcache.remember("k1", {"pi4": PI4, "pi5": "threw"}, cache)
    assert evalcache.remembered("k1", "pi4", cache) == PI4
    assert evalcache.remembered("k1", "pi5", cache) is None  # errors: evaluated again
    assert evalcache.remembered("k2", "pi4", cache) is None  # another flake state
    assert cache.stat().st_mode & 0o777 == 0o600
    assert cache.parent.stat().st_mode & 0o777 == 0o700


def test_the_oldest_flake_states_are_forgotten_first(tmp_path):
    cache = tmp_path / "evaluations.json"
    for n in range(evalcache.MAX_FINGERPRINTS):
        evalcache.remember(f"k{n}", {"pi4": PI4}, cache)
    evalcache.remember("k0", {"pi5": PI4}, cache)  # used again: now the most recent
    evalcache.remember("new", {"pi4": PI4}, cache)
    kept = json.loads(cache.read_text())
    assert len(kept) == evalcache.MAX_FINGERPRINTS
    assert "k1" not in kept  # the oldest
    assert list(kept)[-2:] == ["k0", "new"] and set(kept["k0"]) == {"pi4", "pi5"}


def test_a_broken_cache_is_an_empty_one(tmp_path):
    cache = tmp_path / "evaluations.json"
    for text in ("{not json", "[1, 2]", '{"k1": {"pi4": "one string"}}'):
        cache.write_text(text)
        assert evalcache.remembered("k1", "pi4", cache) is None
    evalcache.remember("k1", {"pi4": PI4}, cache)  # and is replaced by a good one
    assert evalcache.remembered("k1", "pi4", cache) == PI4


def test_an_unwritable_cache_directory_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be
    evalcache.remember("k1", {"pi4": PI4}, blocker / "evaluations.json")
    assert evalcache.remembered("k1", "pi4", blocker / "evaluations.json") is None


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("NIXPUSH_CACHE_DIR", str(tmp_path / "c"))
    assert evalcache.cache_file() == tmp_path / "c" / "evaluations.json"
    monkeypatch.delenv("NIXPUSH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert evalcache.cache_file() == tmp_path / "x" / "nixpush" / "evaluations.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert evalcache.cache_file() == Path.home() / ".cache" / "nixpush" / "evaluations.json"
