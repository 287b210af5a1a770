"""
The shell programs nixpush runs on targets: package data beside this module, POSIX sh,
shellchecked, read once. A line ``# nixpush: include NAME`` stands for the file ``NAME`` here,
indented as the line is: a function several programs need (``handover.sh``) is written once.
"""

from __future__ import annotations

import re
from importlib import resources

_INCLUDE = re.compile(r"^( *)# nixpush: include ([a-z-]+\.sh)\n", re.MULTILINE)


def _read(name: str) -> str:
    return (resources.files("operations.push") / name).read_text(encoding="utf-8")


def program(name: str) -> str:
    """The program ``name`` with its includes in place:
    ``program("prune.sh")`` is prune.sh with handover.sh's function inside it."""

    def included(match: re.Match[str]) -> str:
        indent = match.group(1)
        lines = _read(match.group(2)).splitlines(keepends=True)
        return "".join(indent + line if line.strip() else line for line in lines)

    return _INCLUDE.sub(included, _read(name))
