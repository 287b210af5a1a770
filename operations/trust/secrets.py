"""
Secrets from the sops file onto hosts: declared as data, decrypted on the controller, written
atomically through stdin.

A host's secrets are its ``secrets`` data: lists of entries like

.. code:: python

    {"key": "headscale/pre_auth", "dest": "/run/secrets/headscale-pre-auth",
     "owner": "root", "group": "root", "mode": "0600"}

Deploy code plans them at prepare time, so every error (bad data, sops, a missing owner) stops
the run before any host is touched; the ``secret_file`` operation then installs each one:

.. code:: python

    for planned in plan_secrets(host):
        secrets.secret_file(
            name=f"Install secret {planned.secret.label} at {planned.secret.dest}",
            dest=planned.secret.dest, content=planned.value,
            owner=planned.secret.owner, group=planned.secret.group, mode=planned.secret.mode,
        )

Where the plaintext goes: the controller's memory (``Plaintext``, masked when printed), then
the stdin of one command per changed file. Never argv, environment, pyinfra's output (it does
not print ``_stdin``), files on the controller or messages. The file's sha256 is read back to
compare: it is printed by facts at ``-vvv``, like any fact output.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError, PyinfraError
from pyinfra.api.operation import operation
from pyinfra.context import host
from typing_extensions import override

from operations.core.failures import fail_host
from operations.core.files import (
    ACCOUNT_NAME,
    LinesFact,
    SecretFile,
    UnsafeDirectories,
    chmod_file,
    chown_file,
    write_file,
)
from operations.data.fleet import merged_entries, parse_sops_recipients
from operations.trust.recipients import (
    Reader,
    controller_age_recipients,
    sops_recipients,
    unexpected_readers,
)
from operations.trust.sops import (
    KeyPath,
    Plaintext,
    SopsError,
    decrypt,
    key_path_text,
    parse_key_path,
)

if TYPE_CHECKING:
    from pyinfra.api.host import Host

DEFAULT_MODE = 0o600
# Where the builder keeps what it pushes with (group_data/server.py declares them): nixpush's own
# keys, which open every host the builder pushes to. They are decrypted from
# ``NIXPUSH_SOPS_FILE_KEY``'s file when the host's data sets it (else from ``sops_file``), and
# never from a file a pushed host can decrypt too (``check_push_key_file``). In root's home, not
# /etc: a NixOS builder's /etc is generated (and with system.etc.overlay.mutable = false, read
# only), and not /var/lib/nixpush: the schedule's StateDirectory=, which systemd gives to the
# schedule's user.
DEPLOY_KEY_PATH = "/root/.nixpush/deploy_ed25519"
SIGNING_KEY_PATH = "/root/.nixpush/signing-key.sec"
PUSH_KEY_DESTS = (DEPLOY_KEY_PATH, SIGNING_KEY_PATH)
NIXPUSH_SOPS_FILE_KEY = "nixpush_sops_file"
_ENTRY_KEYS = ("key", "dest", "owner", "group", "mode")


@dataclass(frozen=True, kw_only=True)
class Secret:
    """
    One secret to install, parsed from a ``secrets`` entry by ``host_secrets``.

    + key: the sops key path, e.g. ``("headscale", "pre_auth")``
    + dest: absolute path on the host
    + owner, group: the file's owner and group (default ``root``)
    + mode: permission bits (default ``0o600``)
    """

    key: KeyPath
    dest: str
    owner: str = "root"
    group: str = "root"
    mode: int = DEFAULT_MODE

    @property
    def label(self) -> str:
        """The key path as messages show it: ``secret.label == "headscale/pre_auth"``."""
        return key_path_text(self.key)


@dataclass(frozen=True)
class PlannedSecret:
    """A secret with its decrypted value, ready for ``secret_file``."""

    secret: Secret
    value: Plaintext


class SecretError(PyinfraError):
    """
    A secret can't be installed on a host. The message names the host, the secret and the
    fix, and never holds decrypted text.
    """

    def __init__(self, host_name: str, secret: str, problem: str, fix: str) -> None:
        self.host_name = host_name
        self.secret = secret
        self.problem = problem
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The text pyinfra's CLI prints (it reads ``.message`` when present)."""
        return f"{self.host_name}: secret {self.secret}: {self.problem}; {self.fix}"


# Data: parsing and merging


def parse_mode(value: Any) -> int:
    """
    Permission bits from data, written as a string: ``"0600"`` or ``"600"``. Raises ValueError.

    A number is refused: Python reads ``0o640`` as 416, whose digits would pass for mode 0416,
    and pyinfra's style ``640`` means octal digits; a string means one thing only.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        python = f"0o{value:o}" if 0 <= value <= 0o777 else "no permission"
        raise ValueError(
            f"mode {value!r} is a number, which reads two ways (as Python's {python}, or "
            f'as the digits "{value}")'
        )
    text = value.strip() if isinstance(value, str) else ""
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f'mode {value!r} is not a permission like "0600"')
    return int(text, 8)


def parse_secret(entry: Any) -> tuple[Secret | None, list[str]]:
    """One ``secrets`` entry as a ``Secret``, or None and what is wrong with it (each a fix)."""
    if not isinstance(entry, Mapping):
        return None, [
            f'entry {entry!r} is not a mapping; write it like {{"key": ..., "dest": ...}}'
        ]
    problems: list[str] = []
    unknown = [str(k) for k in entry if k not in _ENTRY_KEYS]
    if unknown:
        problems.append(
            f"has unknown fields {', '.join(unknown)}; use only {', '.join(_ENTRY_KEYS)}"
        )

    key: KeyPath = ()
    raw_key = entry.get("key")
    if not isinstance(raw_key, str):
        problems.append(f'key is {raw_key!r}; set it to a sops key path like "headscale/pre_auth"')
    else:
        try:
            key = parse_key_path(raw_key)
        except ValueError as e:
            problems.append(f"key: {e}")

    dest = entry.get("dest")
    if not isinstance(dest, str) or not _is_clean_absolute(dest):
        problems.append(
            f"dest is {dest!r}; set it to an absolute, normalised file path like "
            '"/run/secrets/name"'
        )

    accounts: dict[str, str] = {}
    for field in ("owner", "group"):
        value = entry.get(field, "root")
        if not isinstance(value, str) or not ACCOUNT_NAME.fullmatch(value):
            problems.append(f"{field} is {value!r}; set it to a user or group name")
        else:
            accounts[field] = value

    mode = DEFAULT_MODE
    if "mode" in entry:
        try:
            mode = parse_mode(entry["mode"])
        except ValueError as e:
            problems.append(f'{e}; write it as a string like "0600"')

    if problems:
        return None, problems
    assert isinstance(dest, str)
    return Secret(key=key, dest=dest, mode=mode, **accounts), []


def _is_clean_absolute(path: str) -> bool:
    return (
        path.startswith("/")
        and path != "/"
        and posixpath.normpath(path) == path
        and not any(c in path for c in "\0\n\r")
    )


def host_secrets(host: Host) -> list[Secret]:
    """
    Every secret ``host`` gets, merged from all the places its ``secrets`` can be set.

    pyinfra replaces a data key set by two groups (the later group wins), which would give a
    host in ``network`` and ``server`` only one root's secrets. So the lists are merged here:
    the ``secrets`` of ``all`` data, of every group the host is in (its roots), of its host data
    and of ``--data``, in that order, deduplicated by ``dest``. Host data and ``--data`` replace
    an entry with the same ``dest``; two groups declaring one ``dest`` differently is an error.
    Raises ``FleetError`` naming the host, the entry and the fix.

    + host: a pyinfra ``Host``

    .. code:: python

        [s.dest for s in host_secrets(inventory.get_host("nas"))]
        # ["/root/.nixpush/deploy_ed25519", "/root/.nixpush/signing-key.sec"]
    """
    return merged_entries(
        host, "secrets", parse_secret, lambda s: s.dest, lambda s: f"installs {s.dest}"
    )


# Planning: decrypt and check on the controller before anything runs


def sops_file(host: Host, secret: Secret) -> str:
    """The sops file ``secret`` is decrypted from: the host's ``nixpush_sops_file`` for the
    builder's push and signing keys when set, else its ``sops_file``; ``SecretError`` saying
    to set it."""
    own = host.data.get(NIXPUSH_SOPS_FILE_KEY) if secret.dest in PUSH_KEY_DESTS else None
    path = own or host.data.get("sops_file")
    if not isinstance(path, str) or not path:
        raise SecretError(
            host.name,
            f"{secret.label} ({secret.dest})",
            "sops_file is not set, so there is nothing to decrypt it from",
            "set sops_file in its host or group data to the sops-encrypted secrets file",
        )
    return path


def check_push_key_file(host: Host, secret: Secret, file: str) -> None:
    """
    ``SecretError`` when ``file`` (holding ``host``'s push or signing key) can be decrypted
    with any master key but the controller's age key and ``host``'s
    ``nixpush_sops_recipients``: sops encrypts a whole file with one data key, so whoever holds
    one could decrypt the key that opens every host ``host`` pushes to. Every recipient counts
    (``key_groups`` too); one that an inventory host's SSH host key gives (sops-nix's) is named
    after it and is never allowed. A file that cannot be read is left to sops to report.
    """
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    allowed, _ = parse_sops_recipients(host.data.get("nixpush_sops_recipients"))
    controller = controller_age_recipients(os.environ, Path.home())
    host_keys = {o.name: o.data.get("ssh_host_key") for o in host.inventory if o.name != host.name}
    readers = unexpected_readers(sops_recipients(text), controller, allowed, host_keys)
    if readers:
        which = "it" if len(readers) == 1 else "any of them"
        unknown = (
            ""
            if controller
            else " (the controller holds no age key nixpush can read in SOPS_AGE_KEY, "
            "SOPS_AGE_KEY_FILE or ~/.config/sops/age/keys.txt)"
        )
        raise SecretError(
            host.name,
            f"{secret.label} ({secret.dest})",
            f"{file} is also encrypted to {', '.join(map(_reader_text, readers))}, besides the "
            f"controller's age key{unknown}, and sops encrypts a whole file with one data key, "
            f"so whoever holds {which} could decrypt the key that opens every host {host.name} "
            "pushes to",
            f"keep nixpush's push and signing keys in a sops file of their own, encrypted only "
            f"to your age key (set {NIXPUSH_SOPS_FILE_KEY} to it, with a .sops.yaml creation "
            f"rule listing only your key), and remove them from {file}; a key of your own "
            f"besides (a backup kept offline) goes in {host.name}'s nixpush_sops_recipients "
            "(a host's key never does)",
        )


def _reader_text(reader: Reader) -> str:
    """``the age key of pi4's SSH host key (sops-nix's)``, ``age key age1...``."""
    if reader.host is not None:
        return f"the age key of {reader.host}'s SSH host key (sops-nix's)"
    kind = {"pgp": "PGP"}.get(reader.recipient.kind, reader.recipient.kind)
    return f"{kind} key {reader.recipient.name}"


def decrypt_secret(host: Host, secret: Secret) -> Plaintext:
    """``secret``'s value from ``host``'s sops file (once per run), or ``SecretError``; for the
    push and signing keys, only from a file no key but the controller's (and the allowed ones)
    can decrypt."""
    label = f"{secret.label} ({secret.dest})"
    try:
        file = sops_file(host, secret)
        # Decrypted first (in memory): a controller without the file's key gets sops's answer,
        # not a list of every recipient as readers.
        value = decrypt(file, secret.key)
        if secret.dest in PUSH_KEY_DESTS:
            check_push_key_file(host, secret, file)
        return value
    except SopsError as e:
        raise SecretError(host.name, label, e.problem, e.fix) from None


def plan_secrets(host: Host, secrets: Sequence[Secret] | None = None) -> list[PlannedSecret]:
    """
    ``host``'s secrets (``host_secrets`` unless given) decrypted, after checking that every
    owner and group exists on the host. Call it from deploy code: it raises ``SecretError`` or
    ``FleetError`` at prepare time, before any host is changed.

    + host: the pyinfra ``Host`` the secrets are for
    + secrets: the secrets to plan; by default all of the host's
    """
    chosen = host_secrets(host) if secrets is None else list(secrets)
    planned = [PlannedSecret(secret, decrypt_secret(host, secret)) for secret in chosen]
    users = sorted({s.owner for s in chosen})
    groups = sorted({s.group for s in chosen})
    if chosen:
        answer: list[str] = host.get_fact(MissingAccounts, users=users, groups=groups)
        missing = set(answer)
        for secret in chosen:
            for kind, account in (("user", secret.owner), ("group", secret.group)):
                if f"{kind}:{account}" in missing:
                    raise SecretError(
                        host.name,
                        f"{secret.label} ({secret.dest})",
                        f"its {'owner' if kind == 'user' else 'group'} {account!r} does not "
                        "exist on the host",
                        f"create the {kind} on the host, or change the entry's "
                        f"{'owner' if kind == 'user' else 'group'}",
                    )
    return planned


# Facts


class MissingAccounts(LinesFact):
    """Which of ``users`` and ``groups`` don't exist: ``["user:alice", "group:media"]``."""

    @override
    def command(self, users: Sequence[str], groups: Sequence[str]) -> StringCommand:
        parts: list[Any] = []
        for user in users:
            parts += [
                "id -u --",
                QuoteString(user),
                ">/dev/null 2>&1 || echo",
                QuoteString(f"user:{user}"),
                ";",
            ]
        for group in groups:
            parts += [
                "getent group",
                QuoteString(group),
                ">/dev/null 2>&1 || echo",
                QuoteString(f"group:{group}"),
                ";",
            ]
        parts.append("true")
        return StringCommand(*parts)

    @override
    def process(self, output: list[str]) -> list[str]:
        return [line for line in output if line.startswith(("user:", "group:"))]


# Operations


@operation()
def secret_file(
    dest: str,
    content: Plaintext,
    owner: str = "root",
    group: str = "root",
    mode: int = DEFAULT_MODE,
) -> Generator[PyinfraCommand, None, None]:
    """
    Install a decrypted secret at ``dest`` with ``owner``, ``group`` and ``mode``.

    + dest: absolute path on the host
    + content: the decrypted value (``plan_secrets`` or ``decrypt``); only its hash is compared
    + owner, group: the file's owner and group; they must exist on the host
    + mode: permission bits, e.g. ``0o600``

    The file is compared by sha256, mode, owner and group. Equal: nothing to do. Only the
    mode or owner differs: chmod / chown. Otherwise the content is written atomically from
    stdin (see ``write_file``). A directory or symlink at ``dest`` is an error; a ``dest``
    under a directory anyone but root can change fails the host (``UnsafeDirectories``).

    **Example:**

    .. code:: python

        secrets.secret_file(
            name="Install the Tailscale pre-auth key",
            dest="/run/secrets/headscale-pre-auth",
            content=decrypt("secrets.yaml", ("headscale", "pre_auth")),
        )
    """
    if not _is_clean_absolute(dest):
        raise OperationError(f"{host.name}: secret destination {dest!r} is not an absolute path")
    current = host.get_fact(SecretFile, path=dest)
    if current is not None and not current.regular:
        raise OperationError(
            f"{host.name}: {dest} is a directory, symlink or other non-file, not the secret "
            f"{content.label}; remove it or choose another dest"
        )
    unsafe = host.get_fact(UnsafeDirectories, path=dest)
    if unsafe:
        yield fail_host(
            f"{host.name}: secret {content.label} ({dest}): {', '.join(unsafe)} can be changed "
            "by someone other than root, who could swap the file for a symlink while it is "
            "written; choose a dest whose directories are root's and writable by root only "
            "(like /run/secrets), or fix their owner and mode"
        )
        return
    if current is None or current.sha256 != content.sha256:
        yield write_file(dest, content.reveal(), owner, group, mode)
        return
    if current.owner == owner and current.group == group and current.mode == mode:
        host.noop(f"{dest} is already up to date")
        return
    if (current.owner, current.group) != (owner, group):
        yield chown_file(dest, owner, group)
    if current.mode != mode:
        yield chmod_file(dest, mode)
