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

import hashlib
import json
import os
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
    LinesFact,
    SecretFile,
    UnsafeDirectories,
    chmod_file,
    chown_file,
    write_file,
)
from operations.core.models import Plaintext
from operations.core.runstate import current_run
from operations.data.secret import DEFAULT_MODE as DEFAULT_MODE
from operations.data.secret import Secret as Secret
from operations.data.secret import is_clean_absolute
from operations.data.secret import parse_mode as parse_mode
from operations.data.secret import parse_secret as parse_secret
from operations.trust.recipients import (
    Reader,
    controller_age_identities,
    identities_recipients,
    sops_recipients,
    unexpected_readers,
)
from operations.trust.sops import SopsError, decrypt

if TYPE_CHECKING:
    from pyinfra.api.host import Host

    from operations.data.fleet import HostSpec

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


# Planning: decrypt and check on the controller before anything runs


def sops_file(spec: HostSpec, secret: Secret) -> tuple[str, str]:
    """The sops file ``secret`` is decrypted from and the data key naming it: the host's
    ``nixpush_sops_file`` for the builder's push and signing keys when set, else its
    ``sops_file``; ``SecretError`` naming the key to set."""
    pushes = secret.dest in PUSH_KEY_DESTS
    if pushes and spec.nixpush_sops_file is not None:
        return spec.nixpush_sops_file, NIXPUSH_SOPS_FILE_KEY
    if spec.sops_file is not None:
        return spec.sops_file, "sops_file"
    key = NIXPUSH_SOPS_FILE_KEY if pushes else "sops_file"
    what = (
        "the sops file holding only nixpush's push and signing keys"
        if pushes
        else ("the sops-encrypted secrets file")
    )
    raise SecretError(
        spec.name,
        f"{secret.label} ({secret.dest})",
        f"{key} is not set, so there is nothing to decrypt it from",
        f"set {key} in its host or group data to {what}",
    )


def check_push_key_file(
    spec: HostSpec, specs: Mapping[str, HostSpec], secret: Secret, file: str
) -> None:
    """
    ``SecretError`` when ``file`` (holding ``spec``'s push or signing key) can be decrypted
    with any master key but the controller's age key and ``spec``'s
    ``nixpush_sops_recipients``: sops encrypts a whole file with one data key, so whoever holds
    one could decrypt the key that opens every host ``spec`` pushes to. Every recipient counts
    (``key_groups`` too); one that an inventory host's SSH host key gives (sops-nix's) is named
    after it and is never allowed. A file that cannot be read is left to sops to report.

    + spec: the builder's spec; specs: the fleet's (``check_fleet``)
    """
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    identities = controller_age_identities(os.environ, Path.home())
    host_keys = {o.name: o.ssh_host_key for o in specs.values() if o.name != spec.name}
    # Every target of a builder decrypts its keys: a pass is kept for the run, by the digest
    # of all it depends on (parsing the file's metadata and deriving the controller's age
    # recipients cost ~20 ms a target). The identities enter only hashed, as for
    # ``Run.ssh_public_keys``.
    inputs = [spec.name, text, identities, spec.nixpush_sops_recipients, sorted(host_keys.items())]
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    passed = current_run().push_key_files_checked
    if digest in passed:
        return
    controller = identities_recipients(identities)
    readers = unexpected_readers(
        sops_recipients(text), controller, spec.nixpush_sops_recipients, host_keys
    )
    if not readers:
        passed.add(digest)
    if readers:
        which = "it" if len(readers) == 1 else "any of them"
        unknown = (
            ""
            if controller
            else " (the controller holds no age key nixpush can read in SOPS_AGE_KEY, "
            "SOPS_AGE_KEY_FILE or ~/.config/sops/age/keys.txt)"
        )
        raise SecretError(
            spec.name,
            f"{secret.label} ({secret.dest})",
            f"{file} is also encrypted to {', '.join(map(_reader_text, readers))}, besides the "
            f"controller's age key{unknown}, and sops encrypts a whole file with one data key, "
            f"so whoever holds {which} could decrypt the key that opens every host {spec.name} "
            "pushes to",
            f"keep nixpush's push and signing keys in a sops file of their own, encrypted only "
            f"to your age key (set {NIXPUSH_SOPS_FILE_KEY} to it, with a .sops.yaml creation "
            f"rule listing only your key), and remove them from {file}; a key of your own "
            f"besides (a backup kept offline) goes in {spec.name}'s nixpush_sops_recipients "
            "(a host's key never does)",
        )


def _reader_text(reader: Reader) -> str:
    """``the age key of pi4's SSH host key (sops-nix's)``, ``age key age1...``."""
    if reader.host is not None:
        return f"the age key of {reader.host}'s SSH host key (sops-nix's)"
    kind = {"pgp": "PGP"}.get(reader.recipient.kind, reader.recipient.kind)
    return f"{kind} key {reader.recipient.name}"


def decrypt_secret(spec: HostSpec, specs: Mapping[str, HostSpec], secret: Secret) -> Plaintext:
    """``secret``'s value from ``spec``'s sops file (once per run), or ``SecretError``; for the
    push and signing keys, only from a file no key but the controller's (and the allowed ones)
    can decrypt."""
    label = f"{secret.label} ({secret.dest})"
    try:
        file, key = sops_file(spec, secret)
        # Decrypted first (in memory): a controller without the file's key gets sops's answer,
        # not a list of every recipient as readers.
        value = decrypt(file, secret.key, data_key=key)
        if secret.dest in PUSH_KEY_DESTS:
            check_push_key_file(spec, specs, secret, file)
        return value
    except SopsError as e:
        raise SecretError(spec.name, label, e.problem, e.fix) from None


def plan_secrets(
    host: Host, specs: Mapping[str, HostSpec], secrets: Sequence[Secret] | None = None
) -> list[PlannedSecret]:
    """
    ``host``'s secrets (its spec's unless given) decrypted, after checking that every owner
    and group exists on the host. Call it from deploy code: it raises ``SecretError`` at
    prepare time, before any host is changed.

    + host: the pyinfra ``Host`` the secrets are for
    + specs: the fleet's specs (``start_deploy(state).specs``)
    + secrets: the secrets to plan; by default all of the host's
    """
    spec = specs[host.name]
    chosen = list(spec.secrets if secrets is None else secrets)
    planned = [PlannedSecret(secret, decrypt_secret(spec, specs, secret)) for secret in chosen]
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
    if not is_clean_absolute(dest):
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
