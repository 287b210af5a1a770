"""
Where each derivation of a run's build was built, from Nix's own log: the build hook's
``building '<drv>' on 'ssh-ng://nix-ssh@nixpush-builder-bld'`` activities (internal-json, type
105, the machine in its second field; empty for a local build), and the pool members it could
not use (``cannot build on '<uri>': <why>``), for the progress lines, the summary and the report.

.. code:: python

    remote_builds(lines)   # {"/nix/store/...-nixos-system-pi4-1.drv": "bld"}
    skipped_members(lines)  # {"bld": "cannot connect: ... Connection refused"}
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pyinfra.api.command import QuoteString, StringCommand

from operations.builder.nix import MACHINES_FILE
from operations.builder.pull import builder_alias
from operations.push.commands import log_entries, plain_output

_ACT_BUILD = 105
_ALIAS_PREFIX = builder_alias("")
_CANNOT_BUILD = re.compile(r"cannot build on '([^']+)': (.*)")


def machine_name(uri: str) -> str:
    """A pool member by its inventory name (``ssh-ng://nix-ssh@nixpush-builder-bld`` -> ``bld``);
    a machine nixpush did not list, by its URI."""
    host = uri.split("://", 1)[-1].split("@", 1)[-1].split("?", 1)[0]
    return host.removeprefix(_ALIAS_PREFIX) if host.startswith(_ALIAS_PREFIX) else uri


def remote_builds(lines: Sequence[str]) -> dict[str, str]:
    """Derivation -> the member that built it, for each derivation the build hook sent away
    (the member's own log of the same build, forwarded with an empty machine, is not a local
    build)."""
    built: dict[str, str] = {}
    for entry in log_entries(lines):
        fields = entry.get("fields") or []
        if entry.get("action") != "start" or entry.get("type") != _ACT_BUILD or len(fields) < 2:
            continue
        drv, machine = str(fields[0]), str(fields[1])
        if machine:
            built[drv] = machine_name(machine)
    return built


def _why(text: str) -> str:
    return " ".join(text.replace("error:", " ").split())


OTHER_KEY = "other-host-key"
# Nix 2.8 does not pass ssh's stderr on (only "unexpected end-of-file"): a skipped member's
# host key is read again with ssh-keyscan and compared with the one its machines line pins.
REFUSED = "its SSH host key is not the ssh_host_key its machines line pins: refused"


def host_key_check_command(member: str) -> StringCommand:
    """On the builder: ``OTHER_KEY`` when ``member`` answers with another host key than the
    one its line in the machines file pins; nothing otherwise (same key, or no answer)."""
    alias = QuoteString(builder_alias(member))
    return StringCommand(
        "set --", alias, "; a=$1; want=$(grep -F \"@$a \"", QuoteString(MACHINES_FILE),
        "| head -n 1 | awk '{print $8}' | base64 -d 2>/dev/null | awk '{print $2}');",
        "h=$(ssh -G -- \"$a\" | awk '$1==\"hostname\"{print $2}');",
        "p=$(ssh -G -- \"$a\" | awk '$1==\"port\"{print $2}');",
        "got=$(ssh-keyscan -T 5 -p \"$p\" -- \"$h\" 2>/dev/null | awk '{print $3}');",
        'if [ -n "$want" ] && [ -n "$got" ] && ! printf "%s\\n" "$got" | grep -qxF -- "$want";',
        "then echo", OTHER_KEY, "; fi",
    )  # fmt: skip


def skipped_members(lines: Sequence[str]) -> dict[str, str]:
    """Member -> why Nix could not build on it (down, refused, wrong host key); the first
    reason each."""
    skipped: dict[str, str] = {}
    for line in plain_output(lines):
        match = _CANNOT_BUILD.search(line)
        if match:
            skipped.setdefault(machine_name(match.group(1)), _why(match.group(2)))
    return skipped


def built_on(derivation: str | None, desired: str, builder: str, builds: dict[str, str]) -> str:
    """The machine that built a toplevel: the member named for its derivation (or for a
    derivation of the same name), else the builder itself."""
    if derivation and derivation in builds:
        return builds[derivation]
    name = desired.rsplit("/", 1)[-1].split("-", 1)[-1]
    for drv, machine in builds.items():
        if drv.rsplit("/", 1)[-1].split("-", 1)[-1].removesuffix(".drv") == name:
            return machine
    return builder


def progress_with_machines(text: str | None, lines: Sequence[str]) -> str | None:
    """A build's progress line, followed by the members building for it: ``..., on bld: 2``."""
    builds = remote_builds(lines)
    if text is None or not builds:
        return text
    counts: dict[str, int] = {}
    for machine in builds.values():
        counts[machine] = counts.get(machine, 0) + 1
    where = ", ".join(f"{machine}: {count}" for machine, count in sorted(counts.items()))
    return f"{text}; sent to the pool ({where})"
