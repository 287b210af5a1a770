"""The README's first-deploy checklist as commands: every ``sh checklist`` fenced block of its
"First-deploy checklist" section, under the number of the step it stands in."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## First-deploy checklist"
STEP = re.compile(r"(\d+)\. ")


def checklist_steps(readme: Path = README) -> list[tuple[str, list[list[str]]]]:
    """``(step number, [command argv, ...])`` in the README's order, steps with commands only."""
    text = readme.read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    steps: list[tuple[str, list[list[str]]]] = []
    step, fence = "", ""
    for line in section.splitlines():
        stripped = line.strip()
        if fence:
            if stripped == "```":
                fence = ""
            elif fence == "checklist" and stripped:
                command = shlex.split(stripped, comments=True)
                if command:
                    if not steps or steps[-1][0] != step:
                        steps.append((step, []))
                    steps[-1][1].append(command)
        elif stripped.startswith("```"):
            fence = "checklist" if stripped == "```sh checklist" else "other"
        elif match := STEP.match(line):
            step = match.group(1)
    return steps
