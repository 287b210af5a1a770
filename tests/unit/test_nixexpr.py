"""Nix strings from Python strings: the indented form only where Nix reads it back
as the same string, checked by the machine's Nix on random strings full of what Nix treats
specially (leading spaces, ``${``, ``''``, ``\\``)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from operations.core.nixexpr import nix_value

needs_nix = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None, reason="needs the machine's Nix"
)

# What Nix treats specially in strings, weighted up; then plain printable text.
_PIECES = ["${", "''", "'", "$", "\\", "\n", "\n", " ", "  ", "\t", "\r", "}", "{", "''${", "'${"]
_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)] + ["é", "☃"]


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 14)):
        pieces.append(rng.choice(_PIECES) if rng.random() < 0.5 else rng.choice(_PRINTABLE))
    text = "".join(pieces)
    # Half of them multi-line and ending in a newline, which the indented form is for.
    return text + "\nend\n" if rng.random() < 0.5 else text


def evaluate(values: list[str], indent: int | None, level: int) -> list[str]:
    """The strings Nix reads back from ``nix_value`` of each, all in one evaluation."""
    expression = "[\n" + "\n".join(nix_value(v, indent, level) for v in values) + "\n]"
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer: list[str] = json.loads(result.stdout)
    return answer


@needs_nix
@pytest.mark.parametrize(
    "text",
    ["  a\n b\n", "  a\n  b\n", "   \n  x\n", "\tx\n  y\n", "'${x}\n'\n", "'''${x}\nz\n",
     "  \n   \n", "a\n \n", "x''\n$\n", "\n\nx\n"],
)  # fmt: skip
def test_strings_nix_would_read_differently_in_the_indented_form_round_trip(text):
    assert evaluate([text], indent=2, level=1) == [text]


def test_the_indented_form_is_kept_where_it_reads_back_the_same():
    assert nix_value({"x": "Host a\n  Port 22\n"}, indent=2) == (
        "{\n  x = ''\n    Host a\n      Port 22\n  '';\n}"
    )
    assert nix_value("  a\n b\n", indent=2) == '"  a\\n b\\n"'  # common indentation: quoted


@needs_nix
@pytest.mark.parametrize("seed", range(4))
def test_random_strings_round_trip_through_nix(seed):
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(150)]
    for indent, level in ((2, 0), (2, 3), (None, 0)):
        assert evaluate(texts, indent, level) == texts
