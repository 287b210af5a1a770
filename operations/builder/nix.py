"""Nix daemon settings on a builder: nix.conf edited in place, the daemon restarted on change."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import FactProcessError, OperationError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from typing_extensions import override

from operations.builder.binfmt import sandbox_path, validate_systems
from operations.core.failures import DeployFailed, fail_host, host_step, require_root
from operations.core.files import ACCOUNT_NAME, FileText, replace_file
from operations.core.nixos_advice import nix_list, nixos_options_error
from operations.core.process import run_on
from operations.data.steady import runs_nixos, runs_systemd

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

NIX_CONF = "/etc/nix/nix.conf"
# Nix's remote builders file (nix.conf `builders = @MACHINES_FILE`).
MACHINES_FILE = "/etc/nix/machines"
DAEMON_SOCKET = "/nix/var/nix/daemon-socket/socket"


# nix.conf text, edited like Nix reads it: `key = value` lines, `#` starts a comment anywhere.


def _setting_key(line: str) -> str | None:
    tokens = line.split("#", 1)[0].split()
    return tokens[0] if len(tokens) >= 2 and tokens[1] == "=" else None


def _setting_value(line: str) -> str:
    return line.split("#", 1)[0].split("=", 1)[1].strip()


def nix_conf_values(text: str, key: str) -> list[str] | None:
    """The value list of ``key``'s last line (Nix takes the last), None if ``key`` is unset."""
    values: list[str] | None = None
    for line in text.split("\n"):
        if _setting_key(line) == key:
            values = _setting_value(line).split()
    return values


def _check_setting(key: str, value: str) -> None:
    if not key or any(c.isspace() or c in "#=" for c in key):
        raise ValueError(f"not a nix.conf setting name: {key!r}")
    if any(c in value for c in "\n\r\0#"):
        # Nix reads a line up to `#`; a newline would start a setting of its own.
        raise ValueError(f"nix.conf value for {key} cannot hold a newline, NUL or '#': {value!r}")


def set_nix_conf(text: str, settings: Mapping[str, str]) -> str:
    """``text`` with each ``key = value`` of ``settings`` set, everything else kept.

    An existing line is replaced in place (the last one when repeated, as Nix takes the last;
    earlier ones are dropped), keeping its trailing comment; a new key is appended.
    Raises ValueError for a value nix.conf cannot hold (newline, NUL, ``#``).
    """
    for key, value in settings.items():
        _check_setting(key, value)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for key, value in settings.items():
        new_line = f"{key} = {value}".rstrip()
        found = [i for i, line in enumerate(lines) if _setting_key(line) == key]
        if not found:
            lines.append(new_line)
            continue
        last = found[-1]
        comment = lines[last].partition("#")[2]
        lines[last] = f"{new_line} #{comment}" if "#" in lines[last] else new_line
        for i in reversed(found[:-1]):
            del lines[i]
    return "".join(f"{line}\n" for line in lines)


def _merged(values: Sequence[str], extra: Sequence[str]) -> str:
    merged: list[str] = []
    for value in (*values, *extra):
        if value not in merged:
            merged.append(value)
    return " ".join(merged)


def wanted_nix_settings(
    text: str,
    config: Mapping[str, Any],
    systems: Sequence[str],
    max_jobs: int | None,
) -> dict[str, str]:
    """The nix.conf settings a builder of ``systems`` needs, merged with what ``text`` has.

    ``config`` is Nix's own view (``NixConfig``): it tells whether the sandbox is on and, when
    nix.conf has no extra-platforms line, what Nix accepts now. ``max_jobs`` None leaves
    max-jobs as it is; no ``systems`` leaves extra-platforms as it is.
    """
    settings: dict[str, str] = {}
    if systems:
        platforms = nix_conf_values(text, "extra-platforms")
        if platforms is None:
            # An extra-platforms line replaces Nix's default (i686-linux etc. on x86_64): keep it.
            platforms = [str(p) for p in config.get("extra-platforms") or []]
        settings["extra-platforms"] = _merged(platforms, systems)
    if max_jobs is not None:
        settings["max-jobs"] = str(max_jobs)
    if config.get("sandbox", True) is not False and systems:
        # With the F flag the kernel holds the interpreter open, so builds in the sandbox run
        # without it; mounting it too is belt and braces (and covers handlers without F).
        paths = nix_conf_values(text, "extra-sandbox-paths") or []
        settings["extra-sandbox-paths"] = _merged(paths, [sandbox_path(s) for s in systems])
    return settings


# Facts


class NixConfText(FileText):
    """The exact text of a nix.conf (default ``/etc/nix/nix.conf``), None if it is missing."""

    @override
    def command(self, path: str = NIX_CONF) -> StringCommand:
        return super().command(path)


# Settings whose value is a credential, never read by nixpush: Nix marks none as secret, and
# `access-tokens` (GitHub/GitLab tokens) is the one whose value is one (`netrc-file` and
# `secret-key-files` name files).
SECRET_SETTINGS = ("access-tokens",)


class NixConfig(FactBase[dict[str, Any] | None]):
    """Settings as Nix reads them (``nix show-config``): ``{"max-jobs": 8, "sandbox": False}``,
    without ``SECRET_SETTINGS``.

    None when ``nix`` is missing.
    """

    @override
    def requires_command(self) -> str:
        return "nix"

    @override
    def command(self) -> str:
        # Nix blanks each secret setting itself, on the host (`--option NAME ''`): its value never
        # reaches pyinfra, which prints a fact's output with -vvv and --debug-facts.
        blanked = " ".join(f"--option {name} ''" for name in SECRET_SETTINGS)
        return f"nix --extra-experimental-features nix-command {blanked} show-config --json"

    @override
    def process(self, output: list[str]) -> dict[str, Any]:
        try:
            raw = json.loads("\n".join(output))
        except json.JSONDecodeError as e:
            raise FactProcessError(f"nix show-config --json: {e}") from None
        return {
            key: entry.get("value")
            for key, entry in raw.items()
            if isinstance(entry, dict) and key not in SECRET_SETTINGS
        }


def nix_not_installed() -> PyinfraCommand:
    """Fail the current host because NixConfig found no ``nix``: every nix.conf writer's answer."""
    return fail_host(f"{host.name}: nix is not installed")


# Command builders


def wait_for_daemon_socket(attempts: int = 100) -> StringCommand:
    """Wait (0.1 s a try, bounded) until the daemon socket accepts a connection."""
    return StringCommand(
        f"i=0; until nix --extra-experimental-features nix-command store ping --store daemon"
        f" >/dev/null 2>&1; do i=$((i+1)); if [ $i -ge {int(attempts)} ]; then"
        f" echo 'nix-daemon does not answer on {DAEMON_SOCKET}' >&2; exit 1; fi;"
        " sleep 0.1; done",
    )


def stop_daemon_listener(attempts: int = 50) -> StringCommand:
    """Stop the nix-daemon listening on the socket and wait (0.1 s a try, bounded) until it exits.

    Only the listener: like systemd's ``KillMode=process`` for nix-daemon.service, the per-client
    workers it forked (which close the listening socket) and ``nix-daemon --stdio`` sessions
    finish the builds and copies they are serving.
    """
    return StringCommand(
        f"pids=$(ss -xlpnH src {DAEMON_SOCKET} | grep -o 'pid=[0-9]*' | cut -d= -f2);"
        ' if [ -n "$pids" ]; then kill $pids; i=0;'
        f" while kill -0 $pids 2>/dev/null; do i=$((i+1)); if [ $i -ge {int(attempts)} ]; then"
        ' echo "nix-daemon $pids does not exit" >&2; exit 1; fi; sleep 0.1; done; fi',
    )


def start_daemon_detached() -> StringCommand:
    """Start nix-daemon in a session of its own, with no tie to the SSH session that starts it.

    ``setsid`` keeps it out of the session's hangup; closing stdin, stdout and stderr lets the
    SSH channel (and pyinfra waiting on it) close as soon as the shell exits.
    """
    return StringCommand("setsid", "nix-daemon", "</dev/null", ">/dev/null", "2>&1", "&")


# Operations


def _group(command: StringCommand) -> StringCommand:
    # `{ ...; }`: so `&&` and `||` apply to the whole command, whatever `;` it holds.
    return StringCommand("{", command, "; }")


def restart_daemon(systemd: bool) -> StringCommand:
    """Restart nix-daemon so it reads nix.conf again, then wait until it answers.

    With systemd the unit is restarted; without it the daemon listening on the socket is
    stopped (its workers finish what they serve) and a new one started, detached.
    """
    if systemd:
        restart = StringCommand("systemctl", "restart", "nix-daemon.service")
    else:
        # start_daemon_detached ends in `&`, which ends the command as `;` would.
        restart = StringCommand(
            _group(stop_daemon_listener()), "&& {", start_daemon_detached(), "}"
        )
    return StringCommand(restart, "&&", _group(wait_for_daemon_socket()))


@operation(is_idempotent=False)
def restart_nix_daemon() -> Generator[PyinfraCommand, None, None]:
    """
    Restart the host's nix-daemon so it reads nix.conf again, then wait until it answers
    (``restart_daemon``).

    **Example:**

    .. code:: python

        nix.restart_nix_daemon()
    """
    yield restart_daemon(runs_systemd())


def previous_nix_conf(nix_conf: str = NIX_CONF) -> str:
    """Where the nix.conf a change replaces is kept until the restarted daemon answers."""
    return f"{nix_conf}.nixpush-previous"


def replace_nix_conf(text: str, nix_conf: str = NIX_CONF) -> StringCommand:
    """Replace nix.conf atomically (temp file + rename in its directory) with ``text``,
    keeping its owner and mode (root 0644 for a new one) and the previous file as
    ``previous_nix_conf``: a full disk or a cut link leaves the old file, never half of one."""
    conf = QuoteString(nix_conf)
    like_before = StringCommand(
        "if [ -e", conf, "]; then chown --reference", conf, '"$tmp"',
        "&& chmod --reference", conf, '"$tmp"; else chmod 0644 "$tmp"; fi',
    )  # fmt: skip
    return replace_file(
        nix_conf, text, like_before, parent_mode=0o755, backup=previous_nix_conf(nix_conf)
    )


@host_step
def _restart_or_restore(state: State, host: Host, nix_conf: str, systemd: bool, sudo: bool) -> bool:
    """Restart the daemon on the new nix.conf; if it doesn't answer, put the previous file
    back, restart again, and fail the host with the cause."""
    previous = QuoteString(previous_nix_conf(nix_conf))
    ok, lines = run_on(host, restart_daemon(systemd), doing="restarting nix-daemon", sudo=sudo)
    if ok:
        run_on(host, StringCommand("rm -f --", previous), doing="removing the backup", sudo=sudo)
        return True
    cause = lines[-1].strip() if lines else "no output"
    conf = QuoteString(nix_conf)
    restore = StringCommand(
        "if [ -e", previous, "]; then mv -fT", previous, conf, "; else rm -f --", conf, "; fi",
        "&&", restart_daemon(systemd),
    )  # fmt: skip
    back, after = run_on(host, restore, doing=f"restoring {nix_conf}", sudo=sudo)
    daemon = (
        "the daemon answers again"
        if back
        else f"the daemon does not answer either ({after[-1].strip() if after else 'no output'})"
    )
    raise DeployFailed(
        f"{host.name}: nix-daemon did not answer after {nix_conf} changed ({cause}); the "
        f"previous {nix_conf} is back and {daemon}; check the new settings with "
        "`nix show-config`, and the daemon's log"
    )


@operation()
def nix_settings(
    systems: list[str],
    max_jobs: int | None = None,
    nix_conf: str = NIX_CONF,
) -> Generator[PyinfraCommand, None, None]:
    """
    Let a builder's Nix build for ``systems`` with ``max_jobs`` parallel jobs.

    + systems: emulated Nix systems to add to ``extra-platforms``
    + max_jobs: nix.conf ``max-jobs``; None leaves it as it is
    + nix_conf: path of nix.conf

    ``extra-platforms`` keeps the values already on its line (or Nix's default list when there
    is none) and adds ``systems``; with the sandbox on, ``extra-sandbox-paths`` gains the QEMU
    interpreters. Other lines and comments are kept. The daemon is restarted only when the
    file changed. On NixOS nothing is written: the host fails with the options to set unless
    Nix already has them.

    **Example:**

    .. code:: python

        nix.nix_settings(systems=["aarch64-linux"], max_jobs=8)
    """
    validate_systems(systems)
    if max_jobs is not None and (
        isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 0
    ):
        raise OperationError(f"{host.name}: nix_max_jobs must be a whole number, not {max_jobs!r}")

    config = host.get_fact(NixConfig)
    if config is None:
        yield nix_not_installed()
        return

    if runs_nixos():
        yield from _check_nixos(config, systems, max_jobs)
        return

    require_root(f"nix-daemon settings live in {nix_conf}")
    text = host.get_fact(NixConfText, path=nix_conf)
    current = text or ""
    settings = wanted_nix_settings(current, config, systems, max_jobs)
    if not settings:
        host.noop(f"no emulated systems and no max-jobs to set in {nix_conf}")
        return
    yield from update_nix_conf(text, settings, f"sets {', '.join(settings)}", nix_conf)


def update_nix_conf(
    text: str | None, settings: Mapping[str, str], what: str, nix_conf: str = NIX_CONF
) -> Generator[PyinfraCommand, None, None]:
    """
    Write ``settings`` into nix.conf (``text`` is its content, None when missing) and restart
    the daemon, or say ``"<nix_conf> already <what>"`` when the file has them already. Every
    nix.conf writer goes through here, so the daemon restarts exactly when the file changed.
    The file is replaced atomically (``replace_nix_conf``); when the restarted daemon does not
    answer, the previous file is put back, the daemon restarted on it, and the host fails
    with the cause (without systemd nothing else would bring a daemon back).
    """
    current = text or ""
    try:
        new = set_nix_conf(current, settings)
    except ValueError as e:
        raise OperationError(f"{host.name}: {nix_conf}: {e}") from None
    if text is not None and new == current:
        host.noop(f"{nix_conf} already {what}")
        return
    systemd = runs_systemd()
    yield replace_nix_conf(new, nix_conf)
    # The operation's own _sudo, as pyinfra resolved it from data and arguments: pyinfra does
    # not apply it to a command run from a FunctionCommand.
    arguments = host.current_op_global_arguments
    sudo = bool(arguments and arguments.get("_sudo"))
    yield FunctionCommand(_restart_or_restore, (nix_conf, systemd, sudo), {})


def add_to_nix_conf_list(
    text: str | None,
    key: str,
    value: str,
    current: Sequence[str],
    separator: str,
    what: str,
    nix_conf: str = NIX_CONF,
) -> Generator[PyinfraCommand, None, None]:
    """
    Set the nix.conf list ``key`` to its ``current`` items plus ``value`` (a noop
    ``"<nix_conf> already <what>"`` when it is there): the one way ``trusted-users``,
    ``builders`` and ``extra-trusted-public-keys`` grow.
    """
    items = list(current) if value in current else [*current, value]
    yield from update_nix_conf(text, {key: separator.join(items)}, what, nix_conf)


def _check_nixos(
    config: Mapping[str, Any], systems: Sequence[str], max_jobs: int | None
) -> Generator[PyinfraCommand, None, None]:
    options: list[str] = []
    platforms = config.get("extra-platforms") or []
    if any(system not in platforms for system in systems):
        # On NixOS boot.binfmt.emulatedSystems also adds them to extra-platforms.
        options.append(f"boot.binfmt.emulatedSystems = {nix_list(systems)};")
    if max_jobs is not None and config.get("max-jobs") != max_jobs:
        options.append(f"nix.settings.max-jobs = {max_jobs};")
    if options:
        yield fail_host(nixos_options_error(host.name, options))
    else:
        host.noop(
            f"{host.name} runs NixOS and its Nix already builds {', '.join(systems) or 'natively'} "
            f"with max-jobs = {config.get('max-jobs')}",
        )


def _check_public_key(key: str) -> None:
    name, _, encoded = key.partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not name or len(raw) != 32 or any(c.isspace() or c == "#" for c in key):
        raise OperationError(
            f"{host.name}: {key!r} is not a Nix public key (name:base64 of 32 bytes)"
        )


@operation()
def trusted_public_key(key: str, nix_conf: str = NIX_CONF) -> Generator[PyinfraCommand, None, None]:
    """
    Make the host's Nix accept store paths signed by ``key``.

    + key: a Nix public key, ``name:base64`` (``nix_public_key`` of the builder's signing key)
    + nix_conf: path of nix.conf

    The key is added to nix.conf's ``extra-trusted-public-keys`` (other lines kept) unless it
    is already listed there or in ``trusted-public-keys``; the daemon is restarted only when
    the file changed. On NixOS nothing is written: the host fails with the option to set
    unless Nix already trusts the key.

    **Example:**

    .. code:: python

        nix.trusted_public_key(key="nas-nixpush-1:8Kf...=")
    """
    _check_public_key(key)
    if runs_nixos():
        config = host.get_fact(NixConfig)
        if config is None:
            yield nix_not_installed()
        elif key in (config.get("trusted-public-keys") or []):
            host.noop(f"{host.name} runs NixOS and its Nix already trusts {key}")
        else:
            # extra-: trusted-public-keys itself would replace the default (cache.nixos.org).
            option = f"nix.settings.extra-trusted-public-keys = {nix_list([key])};"
            yield fail_host(nixos_options_error(host.name, [option]))
        return

    require_root(f"Nix's trusted keys live in {nix_conf}")
    text = host.get_fact(NixConfText, path=nix_conf)
    current = text or ""
    extra = nix_conf_values(current, "extra-trusted-public-keys") or []
    if key in extra or key in (nix_conf_values(current, "trusted-public-keys") or []):
        host.noop(f"{nix_conf} already trusts {key}")
        return
    if host.get_fact(NixConfig) is None:  # asked only now: a trusted key needs no Nix run
        yield nix_not_installed()
        return
    yield from add_to_nix_conf_list(
        text, "extra-trusted-public-keys", key, extra, " ", f"trusts {key}", nix_conf
    )


@operation()
def trusted_user(user: str) -> Generator[PyinfraCommand, None, None]:
    """
    Make ``user`` a trusted user of the builder's Nix (nix.conf ``trusted-users``).

    + user: the builder account remote builds arrive as

    Nix's remote build copies the target's inputs without signatures and builds
    input-addressed derivations: the daemon allows both only to trusted users. The names
    already trusted (the line's, or Nix's default ``root``) are kept; the daemon is restarted
    only when nix.conf changed.

    **Example:**

    .. code:: python

        nix.trusted_user(user="nix-ssh")
    """
    if not ACCOUNT_NAME.fullmatch(user):
        raise OperationError(f"{host.name}: {user!r} is not an account name")
    config = host.get_fact(NixConfig)
    if config is None:
        yield nix_not_installed()
        return
    require_root(f"trusted-users lives in {NIX_CONF}")
    text = host.get_fact(NixConfText, path=NIX_CONF)
    names = nix_conf_values(text or "", "trusted-users")
    if names is None:
        names = [str(name) for name in config.get("trusted-users") or ["root"]]
    yield from add_to_nix_conf_list(text, "trusted-users", user, names, " ", f"trusts {user}")


@operation()
def remote_builders(machines_file: str = MACHINES_FILE) -> Generator[PyinfraCommand, None, None]:
    """
    Make Nix use the machines file: ``builders = @<machines_file>`` in nix.conf.

    + machines_file: path of the machines file

    Builders already on the line (``;``-separated) are kept. The daemon is restarted only when
    nix.conf changed (builds through the daemon read its settings).

    **Example:**

    .. code:: python

        nix.remote_builders()
    """
    wanted = f"@{machines_file}"
    if any(c.isspace() or c in "#;" for c in machines_file):
        raise OperationError(f"{host.name}: {machines_file!r} can't be named in nix.conf")
    require_root(f"builders lives in {NIX_CONF}")
    text = host.get_fact(NixConfText, path=NIX_CONF)
    value = " ".join(nix_conf_values(text or "", "builders") or [])
    parts = [part.strip() for part in value.split(";") if part.strip()]
    yield from add_to_nix_conf_list(text, "builders", wanted, parts, " ; ", f"uses {wanted}")
