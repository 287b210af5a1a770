"""
The project's shared folder (``shared/``: nixos-eval, nixfmt), which the tests use but
nixpush does not ship: ``$NIXPUSH_SHARED`` when set (``.ci/run`` sets it for its clone under
/tmp), else ``shared`` beside the checkout (or beside the folder of worktrees holding it).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def shared_candidates(*parts: str) -> list[Path]:
    """Where ``shared/<parts>`` may be, in the order they are tried."""
    roots = [Path(os.environ["NIXPUSH_SHARED"])] if os.environ.get("NIXPUSH_SHARED") else []
    roots += [REPO.parent / "shared", REPO.parent.parent / "shared"]
    return [root.joinpath(*parts) for root in roots]
