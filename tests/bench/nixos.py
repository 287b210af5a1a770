"""NixOS on the bench: evaluate a generated fragment without nixpkgs, and apply what it asks
to a bench host by hand, the way a NixOS rebuild would write it into the host's ``/etc``.

``evaluate`` calls the fragment with a stub ``{ config, lib, pkgs, ... }`` (``lib``'s few
functions as identities, ``pkgs`` packages as fake store paths) and returns the options it
sets as JSON. The ``*_files`` functions turn those options into the files NixOS generates.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from operations.core.process import run_local
from tests.bench import fleet

STUB_LIB = (
    "{ mkDefault = x: x; mkForce = x: x; mkOverride = _: x: x; mkIf = _: x: x;"
    " mkMerge = xs: xs; mkBefore = x: x; mkAfter = x: x; }"
)
STUB_STORE = "/nix/store/00000000000000000000000000000000-stub"
# What nixpush's environment (operations.nixos.fragments.ENV_EXPRESSION) asks of nixpkgs: a Python
# whose withPackages gives the environment's path (``STUB_ENV``).
STUB_ENV = f"{STUB_STORE}-python3-env"
STUB_PKGS = (
    "{ lib = { versionAtLeast = a: b: builtins.compareVersions a b >= 0; };"
    ' fetchFromGitHub = x: "stub-src";'
    ' python3 = rec { sitePackages = "lib/python3/site-packages";'
    " pkgs = { pyyaml = {}; buildPythonPackage = x: {};"
    ' pyinfra = { version = "3.10.0"; overridePythonAttrs = f: {}; }; };'
    f' withPackages = f: builtins.seq (f pkgs) "{STUB_ENV}"; }}; }}'
)


def evaluate(fragment: Path) -> dict[str, Any]:
    """The options ``fragment`` sets, from ``nix eval`` (Nix 2.8, no nixpkgs)."""
    expression = (
        f"let lib = {STUB_LIB}; pkgs = builtins.listToAttrs (map (name: {{ inherit name;"
        f' value = "{STUB_STORE}-${{name}}"; }}) [ "openssh" "git" "nix" "sops" ]) // {STUB_PKGS};'
        f" in (import (/. + {json.dumps(str(fragment.resolve()))}))"
        " { config = {}; inherit lib pkgs; }"
    )
    result = run_local(
        ["nix", "--extra-experimental-features", "nix-command", "eval", "--json", "--impure",
         "--expr", expression],
        check=True,
    )  # fmt: skip
    options: dict[str, Any] = json.loads(result.stdout)
    return options


def get(options: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """``get(options, "nix.settings.max-jobs")``."""
    value: Any = options
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def nix_conf_lines(options: Mapping[str, Any]) -> list[str]:
    """The nix.conf lines NixOS writes for the fragment's options."""
    lines = [
        f"{key} = {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in (get(options, "nix.settings") or {}).items()
    ]
    emulated = get(options, "boot.binfmt.emulatedSystems") or []
    if emulated:  # boot.binfmt.emulatedSystems adds them to extra-platforms
        lines.append(f"extra-platforms = {' '.join(emulated)}")
    if get(options, "nix.sshServe.trusted"):
        lines.append("trusted-users = root nix-ssh")
    if get(options, "nix.distributedBuilds"):
        lines.append("builders = @/etc/nix/machines")
    return lines


def machines_lines(options: Mapping[str, Any]) -> list[str]:
    """``/etc/nix/machines`` as NixOS renders ``nix.buildMachines``."""
    return [
        " ".join(
            (
                f"{m['protocol']}://{m['sshUser']}@{m['hostName']}",
                ",".join(m["systems"]),
                m.get("sshKey") or "-",
                str(m["maxJobs"]),
                str(m["speedFactor"]),
                ",".join(m["supportedFeatures"]) or "-",
                ",".join(m.get("mandatoryFeatures") or []) or "-",
                m.get("publicHostKey") or "-",
            )
        )
        for m in get(options, "nix.buildMachines") or []
    ]


def known_hosts_lines(options: Mapping[str, Any]) -> list[str]:
    """``/etc/ssh/ssh_known_hosts`` from ``programs.ssh.knownHosts``."""
    return [
        f"{','.join(entry['hostNames'])} {entry['publicKey']}"
        for entry in (get(options, "programs.ssh.knownHosts") or {}).values()
    ]


def sudoers_lines(options: Mapping[str, Any]) -> list[str]:
    """What ``security.sudo.extraRules`` adds to ``/etc/sudoers``."""
    return [
        f"{user} ALL=({rule.get('runAs', 'ALL:ALL')}) "
        f"{''.join(f'{o}: ' for o in command['options'])}{command['command']}"
        for rule in get(options, "security.sudo.extraRules") or []
        for user in rule["users"]
        for command in rule["commands"]
    ]


def unit_files(options: Mapping[str, Any]) -> dict[str, str]:
    """``systemd.services``/``systemd.timers`` rendered as NixOS does: sections of sorted
    ``Key=Value`` lines, its own PATH for a service (from ``path``)."""
    units: dict[str, str] = {}
    for kind in ("services", "timers"):
        for name, unit in (get(options, f"systemd.{kind}") or {}).items():
            sections = {"Unit": dict(unit.get("unitConfig", {}))}
            if kind == "services":
                path = ":".join(f"{p}/bin" for p in unit.get("path", []))
                service = dict(unit["serviceConfig"])
                own = service.pop("Environment", [])
                own = own if isinstance(own, list) else [own]
                sections["Service"] = {"Environment": [f'"PATH={path}"', *own], **service}
            else:
                sections["Timer"] = dict(unit["timerConfig"])
            text = ""
            for section, pairs in sections.items():
                text += f"[{section}]\n"
                for key, value in sorted(pairs.items()):
                    for item in value if isinstance(value, list) else [value]:
                        text += f"{key}={item}\n"
                text += "\n"
            units[f"{name}.{kind[:-1]}"] = text
    return units


def wanted_by(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Unit file name -> the targets that want it (``wantedBy``)."""
    return {
        f"{name}.{kind[:-1]}": list(unit.get("wantedBy", []))
        for kind in ("services", "timers")
        for name, unit in (get(options, f"systemd.{kind}") or {}).items()
    }


# -- a host's files, as root inside it ------------------------------------------------


def read(h: fleet.BenchHost, path: str) -> str | None:
    """A file's text inside the host (a symlink followed), None when missing."""
    result = fleet.run(fleet.in_host(h, ["sh", "-c", 'cat -- "$1" 2>/dev/null', "sh", path]),
                       check=False)  # fmt: skip
    return result.stdout if result.returncode == 0 else None


def write(h: fleet.BenchHost, path: str, text: str, mode: str = "0644") -> None:
    """Write a file inside the host as root (parents made)."""
    script = 'mkdir -p -- "$(dirname -- "$1")" && base64 -d > "$1" && chmod "$2" -- "$1"'
    fleet.run(fleet.in_host(h, ["sh", "-c", script, "sh", path, mode]),
              input=base64.b64encode(text.encode()).decode())  # fmt: skip


def remove(h: fleet.BenchHost, paths: Iterable[str]) -> None:
    fleet.run(fleet.in_host(h, ["rm", "-f", "--", *paths]))


def shell(h: fleet.BenchHost, script: str) -> str:
    """Run a shell script inside the host as root; its output."""
    return fleet.run(fleet.in_host(h, ["sh", "-c", script])).stdout


class Snapshot:
    """Files of a host as they are now, to put back exactly (content, mode) afterwards."""

    def __init__(self, h: fleet.BenchHost, paths: Iterable[str]) -> None:
        self.host = h
        self.files: dict[str, tuple[str, str] | None] = {}
        for path in paths:
            text = read(h, path)
            mode = shell(h, f"stat -c %a {path} 2>/dev/null || true").strip() if text else ""
            self.files[path] = None if text is None else (text, mode or "644")

    def restore(self) -> None:
        gone = [path for path, saved in self.files.items() if saved is None]
        if gone:
            remove(self.host, gone)
        for path, saved in self.files.items():
            if saved is not None and read(self.host, path) != saved[0]:
                write(self.host, path, saved[0], saved[1])

    def unchanged(self) -> bool:
        return all(
            read(self.host, path) == (saved[0] if saved else None)
            for path, saved in self.files.items()
        )


def restart_nix_daemon(h: fleet.BenchHost) -> None:
    """Make the host's nix-daemon read nix.conf again (as a NixOS switch would)."""
    from operations.builder.nix import (
        start_daemon_detached,
        stop_daemon_listener,
        wait_for_daemon_socket,
    )

    for command in (stop_daemon_listener(), start_daemon_detached(), wait_for_daemon_socket()):
        shell(h, command.get_raw_value())
