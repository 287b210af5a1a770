"""
The Nix and NixOS commands the push steps run, and the fact they read: one builder a
command, every value quoted. They run on the builder (evaluate, build, sign, copy) or on the
target (switch-to-configuration, the system profile).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from typing_extensions import override

from operations.builder.nix_commands import (
    NIX,
)
from operations.core.models import CURRENT_SYSTEM, SYSTEM_PROFILE
from operations.core.nixexpr import nix_string
from operations.trust.keys import SIGNING_KEY_PATH
from operations.trust.ssh import SSH_OPTIONS


class SystemLinks(FactBase[tuple[str | None, str | None]]):
    """
    The store paths ``/run/current-system`` and the system profile resolve to, read in one
    command; None for a missing link: ``host.get_fact(SystemLinks)``.
    """

    @override
    def command(self) -> StringCommand:
        return StringCommand(
            "for l in", QuoteString(CURRENT_SYSTEM), QuoteString(SYSTEM_PROFILE), ";",
            'do if [ -e "$l" ]; then echo "$l=$(readlink -f "$l")"; else echo "$l="; fi; done',
        )  # fmt: skip

    @staticmethod
    def default() -> tuple[str | None, str | None]:
        return None, None

    @override
    def process(self, output: list[str]) -> tuple[str | None, str | None]:
        links = dict(line.strip().partition("=")[::2] for line in output)
        return links.get(CURRENT_SYSTEM) or None, links.get(SYSTEM_PROFILE) or None


def sign_command(path: str, key_file: str = SIGNING_KEY_PATH) -> StringCommand:
    return StringCommand(
        *NIX, "store", "sign", "--key-file", QuoteString(key_file), "--recursive",
        QuoteString(path),
    )  # fmt: skip


def copy_command(path: str, user: str, address: str, substitute: bool = False) -> StringCommand:
    # ssh-ng runs `nix-daemon --stdio` on the target as the deploy user: for a user the
    # target's daemon does not trust, paths are accepted only with a signature by a key in
    # its trusted-public-keys, hence the explicit signing before.
    # With `substitute` (substitute_on_target), the target's daemon first fetches the missing
    # paths its own substituters have (from its nix.conf, trusted whoever asks); what it could
    # not fetch, for any reason, is sent by the builder as without it. Nix 2.8's ssh-ng client
    # tells the daemon to substitute by sending its builders-use-substitutes setting, not the
    # flag (RemoteStore::queryValidPaths), so the copy sets both.
    flag = (
        ("--substitute-on-destination", "--option", "builders-use-substitutes", "true")
        if substitute
        else ()
    )
    return StringCommand(
        *NIX, "copy", *flag, "--to", QuoteString(f"ssh-ng://{user}@{address}"), QuoteString(path)
    )


def nix_sshopts(port: int) -> str:
    """NIX_SSHOPTS for the builder's ssh: the deploy key and strict host-key checking against
    the builder's known_hosts (both from deploys/secrets.py), the port (an ssh-ng URL has
    none), and keep-alives so a cut link fails the copy in seconds instead of hanging.
    curve25519 goes first (the defaults stay after it): OpenSSH 9's post-quantum hybrid costs
    the builder ~0.1 s of CPU per target and would keep secret only store paths, which are
    world-readable on both ends. Nix splits it on spaces."""
    return " ".join(
        (
            f"-p {port}",
            *SSH_OPTIONS,
            "-o KexAlgorithms=^curve25519-sha256",
            # OpenSSH 10.1+ warns on every such connection; older ones skip the unknown option.
            "-o IgnoreUnknown=WarnWeakCrypto",
            "-o WarnWeakCrypto=no",
            "-o ConnectTimeout=10",
            "-o ServerAliveInterval=2",
            "-o ServerAliveCountMax=3",
        )
    )


def switch_command(path: str, action: str) -> StringCommand:
    return StringCommand(QuoteString(f"{path}/bin/switch-to-configuration"), QuoteString(action))


# -- many targets of one builder at once -------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """One configuration's toplevel as the builder evaluated it: its store path and the
    derivation that builds it."""

    path: str
    derivation: str


def batch_eval_expression(configs: Sequence[str]) -> str:
    """
    The ``--apply`` function that evaluates the toplevels of ``configs`` (names under
    ``nixosConfigurations``) in one ``nix eval``, so what they share is evaluated once. Each
    name maps to ``{path, drv}``, or to ``{error = "missing"}`` / ``{error = "threw"}`` when
    absent or when ``builtins.tryEval`` caught its failure (``throw``, ``assert``); other
    errors (a missing attribute inside, a type error) fail the whole process. The names travel
    as JSON inside a Nix string, so no name can end the string or splice Nix code.
    """
    names = nix_string(json.dumps(list(configs)))
    return (
        "cs: builtins.listToAttrs (map (n: { name = n; value = "
        "if builtins.hasAttr n cs then "
        "(let t = cs.${n}.config.system.build.toplevel; r = builtins.tryEval t.outPath; in "
        'if r.success then { path = r.value; drv = t.drvPath; } else { error = "threw"; }) '
        'else { error = "missing"; }; }) '
        f"(builtins.fromJSON {names}))"
    )


def batch_eval_command(flake: str, configs: Sequence[str]) -> StringCommand:
    return StringCommand(
        *NIX, "eval", "--json", QuoteString(f"{flake}#nixosConfigurations"),
        "--apply", QuoteString(batch_eval_expression(configs)),
    )  # fmt: skip


def parse_batch_eval(lines: Sequence[str]) -> dict[str, Evaluated | str] | None:
    """
    ``batch_eval_command``'s answer: per name an ``Evaluated`` or why not (``"missing"``,
    ``"threw"``); None when there is no answer (the process failed as a whole).
    """
    for line in reversed(lines):
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            return None
        results: dict[str, Evaluated | str] = {}
        for name, value in data.items():
            if not isinstance(value, dict):
                return None
            path, drv = value.get("path"), value.get("drv")
            if isinstance(path, str) and isinstance(drv, str):
                results[name] = Evaluated(path, drv)
            else:
                results[name] = str(value.get("error") or "no answer")
        return results
    return None


# Nix's internal-json activity and result types (libutil/logging.hh).
_ACT_COPY_PATH, _ACT_COPY_PATHS, _ACT_BUILD = 100, 103, 105
_ACT_BUILDS, _RES_PROGRESS = 104, 105
# Where a step's progress is: its Nix log, in internal-json, on the builder.
_LOG_MARK = "@nix "
INVALID_MARK = "nixpush-not-built:"
# Printed when timeout(1) stopped the step (exit 124).
TIMED_OUT_MARK = "nixpush-timed-out"


# Log entries that only tell progress; the rest (Nix's messages, ssh's) is the step's output.
_PROGRESS_ENTRIES = tuple(
    arg
    for action in ("start", "stop", "result")
    for arg in ("-e", QuoteString(f'@nix {{"action":"{action}"'))
)


def logged(
    command: StringCommand, log: str, timeout: int, then: StringCommand | None = None
) -> StringCommand:
    """
    ``command`` (a Nix command) with its log in ``log`` as internal-json, for progress reads
    while it runs; stopped after ``timeout`` seconds (exit 124). Afterwards its messages
    (Nix's errors and warnings, ssh's) go to stderr, the log is removed, ``then`` runs,
    and the exit code is ``command``'s.
    """
    quoted = QuoteString(log)
    return StringCommand(
        "umask 077; set -C;", "timeout", "--kill-after=10", str(timeout), command,
        "--log-format", "internal-json", "2>", quoted, "; rc=$?;",
        "grep", "-v", "-F", *_PROGRESS_ENTRIES, quoted, ">&2;",
        # The builds Nix's build hook sent to a remote builder, whose machine the run reports.
        "grep", "-F", QuoteString("' on '"), quoted,
        "| grep -F", QuoteString(f'"type":{_ACT_BUILD}'), ">&2;",
        "rm", "-f", quoted, "; if [ $rc -eq 124 ]; then echo", TIMED_OUT_MARK, "; fi;",
        *((then, ";") if then is not None else ()), "exit $rc",
    )  # fmt: skip


def read_log_command(log: str) -> StringCommand:
    """What a running step's log says so far, less build output lines (type 101)."""
    return StringCommand(
        "grep", "-v", "-F", QuoteString('"type":101,'), QuoteString(log), "2>/dev/null", "|| true"
    )


RUNNING_MARK = "nixpush-running:"


def read_build_log_command(log: str) -> StringCommand:
    """``read_log_command``, then ``RUNNING_MARK <drv>`` for each of the last 20 derivations
    Nix started building whose outputs are not in the store yet: Nix 2.8 ends a build's log
    activity only when the whole ``nix build`` ends, so its log alone cannot tell."""
    quoted = QuoteString(log)
    return StringCommand(
        read_log_command(log), ";",
        "for d in $(grep -F", QuoteString('"action":"start"'), quoted, "2>/dev/null",
        "| grep -F", QuoteString(f'"type":{_ACT_BUILD}'),
        "| sed -n", QuoteString(r's/.*"fields":\["\([^"]*\.drv\)".*/\1/p'), "| tail -n 20);",
        'do nix-store --check-validity --print-invalid $(nix-store -q --outputs "$d")',
        "| grep -q . && echo", RUNNING_MARK, '"$d"; done; true',
    )  # fmt: skip


def build_all_command(installables: Sequence[str]) -> StringCommand:
    """One ``nix build`` of every installable: Nix schedules them, with its max-jobs, and
    goes on past failures (``--keep-going``), so one failing build fails only its targets."""
    return StringCommand(
        *NIX, "build", "--no-link", "--keep-going", *(QuoteString(i) for i in installables)
    )


def missing_outputs_command(outputs: Sequence[str]) -> StringCommand:
    """After a build: ``INVALID_MARK``, then the outputs not in the store, one a line."""
    return StringCommand(
        "echo", INVALID_MARK, "; nix-store --check-validity --print-invalid",
        *(QuoteString(o) for o in outputs),
    )  # fmt: skip


def not_built(lines: Sequence[str]) -> set[str] | None:
    """The outputs ``build_all_command`` found missing; None when it never got that far."""
    for index, line in enumerate(lines):
        if line.strip() == INVALID_MARK:
            return {rest.strip() for rest in lines[index + 1 :] if rest.startswith("/nix/store/")}
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_entries(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The internal-json entries among ``lines`` (``@nix {...}``)."""
    entries = []
    for line in lines:
        start = line.find(_LOG_MARK)
        if start < 0:
            continue
        try:
            entry = json.loads(line[start + len(_LOG_MARK) :])
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def plain_output(lines: Sequence[str]) -> list[str]:
    """``lines`` with internal-json messages turned back into Nix's text, colours removed."""
    plain = []
    for line in lines:
        if _LOG_MARK not in line:
            plain.append(line)
            continue
        for entry in log_entries([line]):
            if entry.get("action") == "msg":
                plain.extend(_ANSI.sub("", str(entry.get("msg", ""))).splitlines())
    return plain


def failure_for(derivation: str, lines: Sequence[str]) -> str | None:
    """Nix's error that names ``derivation``, if any (``builder for '...' failed ...``)."""
    for line in plain_output(lines):
        if derivation in line and line.strip().startswith("error:"):
            return line.strip().removeprefix("error:").strip()
    return None


def _activities(entries: Sequence[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], set[int]]:
    started = {e["id"]: e for e in entries if e.get("action") == "start" and "id" in e}
    stopped = {e["id"] for e in entries if e.get("action") == "stop" and "id" in e}
    return started, stopped


def _store_name(path: str) -> str:
    """``/nix/store/<hash>-name[.drv]`` -> ``name``."""
    base = path.rsplit("/", 1)[-1].removesuffix(".drv")
    return base.split("-", 1)[1] if "-" in base else base


def build_progress(lines: Sequence[str]) -> str | None:
    """``2 of 5 derivations built, building nixos-system-pi4-1, nixos-system-pi5-1`` from a
    ``nix build`` log so far; None before Nix knows what it builds."""
    entries = log_entries(lines)
    started, stopped = _activities(entries)
    builds = [i for i, e in started.items() if e.get("type") == _ACT_BUILDS]
    progress = [
        e["fields"]
        for e in entries
        if e.get("action") == "result" and e.get("type") == _RES_PROGRESS
        and e.get("id") in builds and len(e.get("fields", ())) == 4
    ]  # fmt: skip
    marked = [line.split(None, 1)[1] for line in lines if line.startswith(f"{RUNNING_MARK} ")]
    running = [_store_name(drv) for drv in marked] or [
        _store_name(str((e.get("fields") or [""])[0]))
        for i, e in started.items()
        if e.get("type") == _ACT_BUILD and i not in stopped
    ]
    if not progress or not progress[-1][1]:
        return None
    done, expected, _, failed = progress[-1]
    text = f"{done} of {expected} derivations built"
    if failed:
        text += f", {failed} failed"
    if running:
        text += f", building {', '.join(running)}"
    return text


def copy_progress(lines: Sequence[str], sizes: Mapping[str, int]) -> str | None:
    """``1 of 2 paths, 0.1 of 4.2 MiB, copying nixos-system-pi4-1`` from a ``nix copy`` log
    so far; ``sizes``: each path's NAR size (``nix path-info --json``). None before Nix
    knows what it copies."""
    entries = log_entries(lines)
    started, stopped = _activities(entries)
    totals = [e for e in started.values() if e.get("type") == _ACT_COPY_PATHS]
    if not totals:
        return None
    match = re.search(r"\d+", str(totals[-1].get("text", "")))
    paths = [e for e in started.values() if e.get("type") == _ACT_COPY_PATH]
    done = [str((e.get("fields") or [""])[0]) for e in paths if e["id"] in stopped]
    running = [str((e.get("fields") or [""])[0]) for e in paths if e["id"] not in stopped]
    expected = int(match.group()) if match else len(paths)
    text = f"{len(done)} of {expected} paths"
    if sizes:
        copied = sum(sizes.get(path, 0) for path in done)
        text += f", {copied / 2**20:.1f} of {sum(sizes.values()) / 2**20:.1f} MiB"
    if running:
        text += f", copying {', '.join(_store_name(path) for path in running)}"
    return text
