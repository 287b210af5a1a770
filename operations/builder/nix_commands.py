"""
The Nix commands every build on the builder runs, push or image: the flake attribute of a
system's build output, evaluate, build, path-info, metadata, and how their answers read.
Every value quoted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pyinfra.api.command import QuoteString, StringCommand

NIX = ("nix", "--extra-experimental-features", QuoteString("nix-command flakes"))
_SIMPLE_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")


def toplevel_attr(flake: str, config: str) -> str:
    """``toplevel_attr("path:/f", "pi4") == "path:/f#nixosConfigurations.pi4.config.system..."``."""
    return system_build_attr(flake, config, "toplevel")


def system_build_attr(flake: str, config: str, output: str) -> str:
    """The flake attribute of ``config.system.build.<output>`` (toplevel, isoImage, sdImage)."""
    name = config if _SIMPLE_ATTR.match(config) else json.dumps(config)
    return f"{flake}#nixosConfigurations.{name}.config.system.build.{output}"


def nix_error(lines: Sequence[str]) -> str:
    """The last ``error:`` line of Nix's output, else its last line."""
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    return (lines[-1].strip() if lines else "no output") or "no output"


def eval_command(attr: str) -> StringCommand:
    return StringCommand(*NIX, "eval", "--raw", QuoteString(f"{attr}.outPath"))


def flake_metadata_command(flake: str) -> StringCommand:
    return StringCommand(*NIX, "flake", "metadata", "--json", QuoteString(flake))


def path_info_command(path: str) -> StringCommand:
    return StringCommand(*NIX, "path-info", QuoteString(path))


def diff_closures_command(before: str, after: str) -> StringCommand:
    return StringCommand(*NIX, "store", "diff-closures", QuoteString(before), QuoteString(after))


def build_command(attr: str) -> StringCommand:
    return StringCommand(*NIX, "build", QuoteString(attr), "--no-link", "--json")


def built_paths(lines: Sequence[str]) -> list[str]:
    """The output paths in ``nix build --json``'s answer (Nix 2.8 has no --print-out-paths)."""
    for line in reversed(lines):
        if line.startswith("["):
            try:
                results = json.loads(line)
            except json.JSONDecodeError:
                continue
            return [out for r in results for out in r.get("outputs", {}).values()]
    return []
