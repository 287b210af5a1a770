"""
What a builder's evaluation answered, remembered on the controller from run to run, so a run
where nothing changed does not evaluate nixpkgs again.

A flake evaluates purely: a configuration's toplevel (store path and derivation) follows from
the locked flake alone, that is its source's ``narHash`` and the lock of every input, which
``nix flake metadata`` tells in well under a second. That is the key (``fingerprint``). The
plan uses a remembered answer only to find a target already on its system; a target that needs
anything is planned from a fresh evaluation, so nothing is built or copied from a remembered
derivation the builder may have collected since. A flake Nix cannot lock (no ``narHash``) is
never remembered.

The file is ``$NIXPUSH_CACHE_DIR/evaluations.json`` (default ``$XDG_CACHE_HOME/nixpush``, else
``~/.cache/nixpush``; nixpush-run's deploys use its state directory's ``cache/``); deleting it
is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from operations.core.files import make_dirs, write_atomically
from operations.push.commands import Evaluated

# Bump when the meaning of an answer changes (e.g. the evaluation expression).
CACHE_VERSION = 1
# Flake states remembered; the oldest is forgotten first.
MAX_FINGERPRINTS = 32
CACHE_DIR_ENV = "NIXPUSH_CACHE_DIR"


def cache_file() -> Path:
    """Where the answers are kept on the controller."""
    directory = os.environ.get(CACHE_DIR_ENV)
    if not directory:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = str(Path(base) / "nixpush")
    return Path(directory) / "evaluations.json"


def fingerprint(flake: str, metadata: Mapping[str, Any]) -> str | None:
    """
    Names everything a pure evaluation of ``flake`` reads: its locked source and every
    input's lock, from ``nix flake metadata --json``. None when Nix gave no ``narHash``.

    .. code:: python

        fingerprint("github:me/fleet", {"locked": {"narHash": "sha256-..."}, "locks": {...}})
    """
    locked = metadata.get("locked")
    nar_hash = locked.get("narHash") if isinstance(locked, dict) else None
    if not isinstance(nar_hash, str) or not nar_hash:
        return None
    identity = [CACHE_VERSION, flake, nar_hash, metadata.get("locks")]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load(path: Path) -> dict[str, dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: evaluate as if empty
    return data if isinstance(data, dict) else {}


def remembered(key: str, config: str, path: Path | None = None) -> Evaluated | None:
    """``config``'s answer under the flake state ``key``, if a run remembered one."""
    entry = _load(path or cache_file()).get(key, {}).get(config)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
        return Evaluated(path=entry[0], derivation=entry[1])
    return None


def remember(key: str, answers: Mapping[str, Evaluated | str], path: Path | None = None) -> None:
    """Keep the answers that evaluated (errors are not kept: the next run tries again).
    A cache that cannot be written is skipped: it only saves time."""
    found = {
        name: [a.path, a.derivation] for name, a in answers.items() if isinstance(a, Evaluated)
    }
    if not found:
        return
    path = path or cache_file()
    data = _load(path)
    entry = data.pop(key, {})  # re-inserted last: the most recent flake state
    entry.update(found)
    data[key] = entry
    for stale in list(data)[:-MAX_FINGERPRINTS]:
        del data[stale]
    try:
        make_dirs(path.parent, 0o700)
        write_atomically(path, json.dumps(data, sort_keys=False), mode=0o600)
    except OSError:
        return
