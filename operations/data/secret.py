"""
A ``secrets`` entry as data: what ``operations.data.fleet`` parses each entry into (``Secret``),
with its sops key path, mode, owner and group checked. Decrypting and installing them is
``operations.trust.secrets``'s.

.. code:: python

    secret, problems = parse_secret({"key": "headscale/pre_auth", "dest": "/run/secrets/x"})
    secret.key, secret.mode    # ("headscale", "pre_auth"), 0o600
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from operations.core.files import ACCOUNT_NAME
from operations.core.models import KeyPath

DEFAULT_MODE = 0o600
_ENTRY_KEYS = ("key", "dest", "owner", "group", "mode")
_BRACKETED = re.compile(r'\[(?:"((?:[^"\\]|\\.)*)"|(\d+))\]')


def parse_key_path(text: str) -> KeyPath:
    """
    A sops key path from ``a/b`` or sops's own ``["a"]["b"]`` (``[0]`` indexes a list).
    Raises ValueError naming the problem.

    .. code:: python

        parse_key_path("headscale/pre_auth") == ("headscale", "pre_auth")
        parse_key_path('["ssh"]["nas_deploy"]') == ("ssh", "nas_deploy")
    """
    text = text.strip()
    if not text:
        raise ValueError("the key path is empty")
    if text.startswith("["):
        parts: list[str | int] = []
        position = 0
        for match in _BRACKETED.finditer(text):
            if match.start() != position:
                break
            quoted, index = match.groups()
            parts.append(json.loads(f'"{quoted}"') if quoted is not None else int(index))
            position = match.end()
        if position != len(text) or not parts:
            raise ValueError(f'{text!r} is not a sops key path like ["headscale"]["pre_auth"]')
        return tuple(parts)
    segments = text.split("/")
    if any(not segment for segment in segments):
        raise ValueError(f"{text!r} has an empty part; write it like headscale/pre_auth")
    return tuple(segments)


def key_path_text(path: KeyPath) -> str:
    """How nixpush names a key path in messages: ``key_path_text(("a", "b")) == "a/b"``."""
    return "/".join(str(part) for part in path)


@dataclass(frozen=True, kw_only=True)
class Secret:
    """
    One secret to install, parsed from a ``secrets`` entry by ``host_secrets``.

    + key: the sops key path, e.g. ``("headscale", "pre_auth")``
    + dest: absolute path on the host
    + owner, group: the file's owner and group (default ``root``)
    + mode: permission bits (default ``0o600``)
    """

    key: KeyPath
    dest: str
    owner: str = "root"
    group: str = "root"
    mode: int = DEFAULT_MODE

    @property
    def label(self) -> str:
        """The key path as messages show it: ``secret.label == "headscale/pre_auth"``."""
        return key_path_text(self.key)


def parse_mode(value: Any) -> int:
    """
    Permission bits from data, written as a string: ``"0600"`` or ``"600"``. Raises ValueError.

    A number is refused: Python reads ``0o640`` as 416, whose digits would pass for mode 0416,
    and pyinfra's style ``640`` means octal digits; a string means one thing only.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        python = f"0o{value:o}" if 0 <= value <= 0o777 else "no permission"
        raise ValueError(
            f"mode {value!r} is a number, which reads two ways (as Python's {python}, or "
            f'as the digits "{value}")'
        )
    text = value.strip() if isinstance(value, str) else ""
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f'mode {value!r} is not a permission like "0600"')
    return int(text, 8)


def parse_secret(entry: Any) -> tuple[Secret | None, list[str]]:
    """One ``secrets`` entry as a ``Secret``, or None and what is wrong with it (each a fix)."""
    if not isinstance(entry, Mapping):
        return None, [
            f'entry {entry!r} is not a mapping; write it like {{"key": ..., "dest": ...}}'
        ]
    problems: list[str] = []
    unknown = [str(k) for k in entry if k not in _ENTRY_KEYS]
    if unknown:
        problems.append(
            f"has unknown fields {', '.join(unknown)}; use only {', '.join(_ENTRY_KEYS)}"
        )

    key: KeyPath = ()
    raw_key = entry.get("key")
    if not isinstance(raw_key, str):
        problems.append(f'key is {raw_key!r}; set it to a sops key path like "headscale/pre_auth"')
    else:
        try:
            key = parse_key_path(raw_key)
        except ValueError as e:
            problems.append(f"key: {e}")

    dest = entry.get("dest")
    if not isinstance(dest, str) or not is_clean_absolute(dest):
        problems.append(
            f"dest is {dest!r}; set it to an absolute, normalised file path like "
            '"/run/secrets/name"'
        )

    accounts: dict[str, str] = {}
    for field in ("owner", "group"):
        value = entry.get(field, "root")
        if not isinstance(value, str) or not ACCOUNT_NAME.fullmatch(value):
            problems.append(f"{field} is {value!r}; set it to a user or group name")
        else:
            accounts[field] = value

    mode = DEFAULT_MODE
    if "mode" in entry:
        try:
            mode = parse_mode(entry["mode"])
        except ValueError as e:
            problems.append(f'{e}; write it as a string like "0600"')

    if problems:
        return None, problems
    assert isinstance(dest, str)
    return Secret(key=key, dest=dest, mode=mode, **accounts), []


def is_clean_absolute(path: str) -> bool:
    """An absolute, normalised path on one line, not ``/``: ``/run/secrets/x``."""
    return (
        path.startswith("/")
        and path != "/"
        and posixpath.normpath(path) == path
        and not any(c in path for c in "\0\n\r")
    )
