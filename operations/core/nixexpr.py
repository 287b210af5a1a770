"""
Nix expressions from plain Python values: what the generated NixOS fragments, the NixOS
advice in error messages and the push flow's batched evaluation (``push/commands.py``) are
written with, so every string is escaped in one place.

.. code:: python

    nix_value({"nix.settings.max-jobs": 8, "boot.binfmt.emulatedSystems": ["aarch64-linux"]})
    # '{ nix.settings.max-jobs = 8; boot.binfmt.emulatedSystems = [ "aarch64-linux" ]; }'
    nix_value([Raw("pkgs.openssh")])   # '[ pkgs.openssh ]'

Keys of a dict may be attribute paths (``a.b.c``): each part that is not a plain Nix
identifier is quoted (``users.users."my user".openssh``). Lists and dicts render on one line
unless ``indent`` is given, then laid out as nixfmt (RFC 166 style, nixfmt-rfc-style) lays
them out, so a formatter in the owner's pre-commit leaves generated files alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Nix identifiers: a letter or _, then letters, digits, _, ' and -.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_KEYWORDS = frozenset(("if", "then", "else", "assert", "with", "let", "in", "rec", "inherit", "or"))
_RAW = re.compile(r"[A-Za-z_][A-Za-z0-9_'.-]*")


@dataclass(frozen=True)
class Raw:
    """A Nix expression written as is: only a (dotted) name such as ``pkgs.openssh``."""

    expression: str

    def __post_init__(self) -> None:
        if not _RAW.fullmatch(self.expression):
            raise ValueError(f"not a plain Nix name: {self.expression!r}")


@dataclass(frozen=True)
class Interpolated:
    """A Nix string with names spliced in, the text escaped like any string:
    ``Interpolated(("", Raw("nixpush"), "/bin/python"))`` renders ``"${nixpush}/bin/python"``."""

    parts: tuple[str | Raw, ...]

    def render(self) -> str:
        return (
            '"'
            + "".join(
                f"${{{part.expression}}}" if isinstance(part, Raw) else nix_string(part)[1:-1]
                for part in self.parts
            )
            + '"'
        )


def nix_string(text: str) -> str:
    """A double-quoted Nix string: ``\\``, ``"`` and ``${`` escaped, newlines as ``\\n``."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("${", "\\${")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    if "\0" in escaped:
        raise ValueError("a Nix string cannot hold NUL")
    return f'"{escaped}"'


def attr_name(part: str) -> str:
    """One attribute name: as is when it is an identifier, else quoted."""
    return part if _IDENTIFIER.fullmatch(part) and part not in _KEYWORDS else nix_string(part)


def attr_path(path: str) -> str:
    """``attr_path("users.users.beau") == "users.users.beau"``; parts quoted as needed.

    A key holding a ``.`` that is not a separator must be given quoted already:
    use ``attr_path_of(["programs", "ssh", "knownHosts", "nas.lan"])``.
    """
    return attr_path_of(path.split("."))


def attr_path_of(parts: Sequence[str]) -> str:
    if not parts or any(not part for part in parts):
        raise ValueError(f"empty attribute name in {list(parts)!r}")
    return ".".join(attr_name(part) for part in parts)


@dataclass(frozen=True)
class Attr:
    """A dict key that is one attribute name, never split on ``.``: ``{Attr("nas.lan"): ...}``."""

    name: str


def _key(key: str | Attr | tuple[str, ...]) -> str:
    if isinstance(key, Attr):
        return attr_name(key.name)
    return attr_path_of(key) if isinstance(key, tuple) else attr_path(key)


def nix_value(value: object, indent: int | None = None, level: int = 0, used: int = 0) -> str:
    """
    ``value`` as a Nix expression.

    + value: str, int, bool, None (``null``), ``Raw``, ``Interpolated``, a list/tuple of
      values, or a dict whose keys are attribute paths (str: split on ``.``; a tuple: its
      parts) or names (``Attr``)
    + indent: spaces per level, laid out as nixfmt (RFC 166 style) does: a list or set of two
      or more elements one element per line, a single element on one line when it fits in
      ``WIDTH`` columns (a set that is a binding's value is always expanded: ``nix_binding``);
      None renders everything on one line
    + used: columns of the line already taken before the value (its key, for a binding)
    """
    if isinstance(value, Raw):
        return value.expression
    if isinstance(value, Interpolated):
        return value.render()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if indent is not None and _multiline(value):
            return _indented_string(value, " " * (indent * (level + 1)), " " * (indent * level))
        return nix_string(value)
    if isinstance(value, Mapping):
        items = [nix_binding(_key(key), item, indent, level + 1) for key, item in value.items()]
        return _block("{", items, "}", indent, level, used)
    if isinstance(value, Sequence):
        inner = 0 if indent is None else indent * (level + 1)
        items = [nix_value(item, indent, level + 1, inner) for item in value]
        return _block("[", items, "]", indent, level, used)
    raise TypeError(f"no Nix value for {type(value).__name__}: {value!r}")


def nix_binding(key: str, value: object, indent: int | None = None, level: int = 0) -> str:
    """
    ``key = value;`` at ``level`` (``indent * level`` columns in), laid out as nixfmt's
    binders (RFC 166): a non-empty set is always expanded, one attribute a line, even a
    single one (``unitConfig = {\n  Description = "...";\n};``); every value nixpush writes
    (a string, a number, a name) is "simple" and stays on the ``=`` line however long it is.
    """
    if indent is None:
        return f"{key} = {nix_value(value)};"
    if isinstance(value, Mapping) and value:
        items = [nix_binding(_key(k), item, indent, level + 1) for k, item in value.items()]
        inner = " " * (indent * (level + 1))
        body = "".join(f"\n{inner}{item}" for item in items)
        return f"{key} = {{{body}\n{' ' * (indent * level)}}};"
    start = indent * level + len(key) + len(" = ")
    return f"{key} = {nix_value(value, indent, level, start)};"


# nixfmt's line width.
WIDTH = 100


def _multiline(text: str) -> bool:
    """Whether ``text`` is written as an indented string: several lines ending in a newline,
    which that form gives back unchanged."""
    if not text.endswith("\n") or text.count("\n") < 2 or any(c in text for c in "\r\t\0"):
        return False
    # Nix strips the lines' common indentation (the spaces before the first other character,
    # over the lines that have one): one such line must start in column 0, or the string
    # would lose it. And a quote before an escaped ${ joins its escape: the quotes read as
    # the escape of two quotes, then ${ as an interpolation.
    flush = any(line and line[0] != " " for line in text.split("\n"))
    return flush and "'${" not in text


def _indented_string(text: str, inner: str, outer: str) -> str:
    """A two-single-quote string, a line each (in it, two quotes are written as three and
    ``${`` as two quotes then ``${``)."""
    escaped = text.replace("''", "'''").replace("${", "''${")
    lines = "".join(f"{inner}{line}\n" if line else "\n" for line in escaped.split("\n")[:-1])
    return f"''\n{lines}{outer}''"


def _block(
    opening: str, items: list[str], closing: str, indent: int | None, level: int, used: int
) -> str:
    if not items:
        return f"{opening} {closing}"
    one_line = f"{opening} {' '.join(items)} {closing}"
    if indent is None:
        return one_line
    # nixfmt: one element stays on the line when it fits (";" or "," may follow); two or
    # more always go one per line.
    if len(items) == 1 and "\n" not in one_line and used + len(one_line) + 1 <= WIDTH:
        return one_line
    inner = " " * (indent * (level + 1))
    outer = " " * (indent * level)
    return opening + "".join(f"\n{inner}{item}" for item in items) + f"\n{outer}{closing}"
