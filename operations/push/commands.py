"""
The Nix and NixOS commands the push steps run, and the fact they read: one builder a
command, every value quoted. They run on the builder (evaluate, build, sign, copy) or on the
target (switch-to-configuration, the system profile).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from typing_extensions import override

from operations.keys import SIGNING_KEY_PATH
from operations.models import SYSTEM_PROFILE
from operations.ssh import SSH_OPTIONS

NIX = ("nix", "--extra-experimental-features", QuoteString("nix-command flakes"))
_SIMPLE_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")


class StorePathLink(FactBase[str | None]):
    """
    The store path a link resolves to, or None when it is missing:
    ``host.get_fact(StorePathLink, path="/run/current-system")``.
    """

    @override
    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "if [ -e", QuoteString(path), "]; then readlink -f", QuoteString(path), "; fi"
        )

    @override
    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


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


def sign_command(path: str, key_file: str = SIGNING_KEY_PATH) -> StringCommand:
    return StringCommand(
        *NIX, "store", "sign", "--key-file", QuoteString(key_file), "--recursive",
        QuoteString(path),
    )  # fmt: skip


def copy_command(path: str, user: str, address: str) -> StringCommand:
    # ssh-ng runs `nix-daemon --stdio` on the target as the deploy user: for a user the
    # target's daemon does not trust, paths are accepted only with a signature by a key in
    # its trusted-public-keys, hence the explicit signing before.
    return StringCommand(
        *NIX, "copy", "--to", QuoteString(f"ssh-ng://{user}@{address}"), QuoteString(path)
    )


def nix_sshopts(port: int) -> str:
    """NIX_SSHOPTS for the builder's ssh: the deploy key and strict host-key checking against
    the builder's known_hosts (both from deploys/secrets.py), the port (an ssh-ng URL has
    none), and keep-alives so a cut link fails the copy in seconds instead of hanging. Nix
    splits it on spaces."""
    return " ".join(
        (
            f"-p {port}",
            *SSH_OPTIONS,
            "-o ConnectTimeout=10",
            "-o ServerAliveInterval=2",
            "-o ServerAliveCountMax=3",
        )
    )


def switch_command(path: str, action: str) -> StringCommand:
    return StringCommand(QuoteString(f"{path}/bin/switch-to-configuration"), QuoteString(action))


def set_profile_command(path: str) -> StringCommand:
    return StringCommand("nix-env", "-p", SYSTEM_PROFILE, "--set", QuoteString(path))
