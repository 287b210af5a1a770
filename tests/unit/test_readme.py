"""
The documentation against the code: the README's data-key reference lists exactly the keys
nixpush reads (``fleet.NIXPUSH_KEYS``), so a key added without a row fails here; and every
relative link and repository path the three READMEs name exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from operations.core.models import Action
from operations.data.fleet import NIXPUSH_KEYS, PYINFRA_KEYS

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = (README, REPO / "operations" / "README.md", REPO / "tests" / "README.md")
# Where a repository path starts; other paths in the docs are on hosts or in the owner's flake.
TOP_DIRS = ("deploys/", "operations/", "tests/", "group_data/")

_FENCE = re.compile(r"^\s*```")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: ``slug("Secrets (sops)") == "secrets-sops"``."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in prose_lines(path.read_text())
        if re.match(r"#{1,6} ", line)
    }


def section(text: str, heading: str) -> list[str]:
    """The prose lines under ``heading`` (a whole heading line), up to the next heading."""
    lines = prose_lines(text)
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start:end]


def table_rows(lines: list[str]) -> list[list[str]]:
    """The first markdown table in ``lines``: its body rows, cells stripped."""
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # after the header and its |---| line


def first_column_keys(rows: list[list[str]]) -> list[str]:
    keys = []
    for row in rows:
        match = re.fullmatch(r"`([^`]+)`", row[0])
        assert match, f"a reference row's first cell is one key in backticks: {row[0]!r}"
        keys.append(match.group(1))
    return keys


def test_slug_is_githubs():
    assert slug("Secrets (sops)") == "secrets-sops"
    assert slug("nixpush's keys") == "nixpushs-keys"
    assert slug("Deploying the NAS itself and x86_64 hosts") == (
        "deploying-the-nas-itself-and-x86_64-hosts"
    )


def test_the_key_reference_lists_exactly_the_keys_nixpush_reads():
    rows = table_rows(section(README.read_text(), "### nixpush's keys"))
    keys = first_column_keys(rows)
    assert len(keys) == len(set(keys)), "one row per key"
    missing = sorted(set(NIXPUSH_KEYS) - set(keys))
    unknown = sorted(set(keys) - set(NIXPUSH_KEYS))
    assert not missing, f"keys in NIXPUSH_KEYS without a row in the README's reference: {missing}"
    assert not unknown, f"rows in the README's reference for keys nixpush does not read: {unknown}"
    assert all(len(row) == 4 and all(row) for row in rows), "key, where, default, meaning"


def test_every_deploy_action_is_documented():
    rows = table_rows(section(README.read_text(), "### nixpush's keys"))
    (meaning,) = [row[3] for row in rows if row[0] == "`deploy_action`"]
    missing = [action.value for action in Action if f"`{action.value}`" not in meaning]
    assert not missing, f"deploy_action values missing from the reference: {missing}"


def test_the_pyinfra_keys_nixpush_reads_are_documented():
    rows = table_rows(section(README.read_text(), "### pyinfra's keys nixpush reads"))
    keys = set(first_column_keys(rows))
    assert {*PYINFRA_KEYS, "_sudo"} <= keys


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for line in prose_lines(doc.read_text()):
        for target in _LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(target)
            elif anchor and (file.is_dir() or anchor not in anchors(file)):
                broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links that lead nowhere: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_exist(doc: Path):
    missing = []
    for line in prose_lines(doc.read_text()):
        for code in _CODE.findall(line):
            for word in code.split():
                word = word.rstrip(".,;:)")
                if not word.startswith(TOP_DIRS) or any(c in word for c in "*<>$"):
                    continue
                if not (REPO / word).exists():
                    missing.append(word)
    name = doc.relative_to(REPO)
    assert not missing, f"{name} names paths that are not in the repository: {missing}"


_ISSUE = re.compile(r"\bissue #?\d+|(?<![$\w])#\d{1,3}\b", re.IGNORECASE)
# Code and tests as well as the READMEs: names say what a thing is, never which work item
# brought it (this file holds the pattern itself).
_NO_HISTORY = (
    *DOCS,
    *(
        path
        for folder in ("operations", "tests", "deploys", "group_data")
        for path in sorted((REPO / folder).rglob("*"))
        if path.suffix in (".py", ".sh", ".nix", ".md") and path != Path(__file__).resolve()
    ),
)


@pytest.mark.parametrize("path", _NO_HISTORY, ids=lambda p: str(p.relative_to(REPO)))
def test_no_file_names_a_work_item_or_a_missing_file(path: Path):
    text = path.read_text()
    assert "BENCH.md" not in text, f"{path.relative_to(REPO)} names BENCH.md"
    issue = _ISSUE.search(text)
    assert issue is None, f"{path.relative_to(REPO)}: {issue.group()}"
