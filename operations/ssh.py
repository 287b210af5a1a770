"""SSH trust between hosts: a user's ``authorized_keys`` and a ``known_hosts`` file, one line each.

The builder pushes to targets as root with the deploy key from sops (``DEPLOY_KEY_PATH``),
verifying each target against ``BUILDER_KNOWN_HOSTS``:

.. code:: python

    ssh -i /etc/nixpush/deploy_ed25519 -o IdentitiesOnly=yes \\
        -o UserKnownHostsFile=/etc/nixpush/known_hosts -o StrictHostKeyChecking=yes ...
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Directory
from typing_extensions import override

from operations.process import find_program, run_local
from operations.secrets import (
    DEPLOY_KEY_PATH,
    SIGNING_KEY_PATH,
    SecretError,
    builder_secret,
    chmod_file,
    chown_file,
    nix_public_key,
    write_file,
)
from operations.sops import Plaintext

if TYPE_CHECKING:
    from pyinfra.api.host import Host

BUILDER_KNOWN_HOSTS = "/etc/nixpush/known_hosts"
# ssh options for pushing from the builder (as root) to a target.
SSH_OPTIONS = (
    "-i", DEPLOY_KEY_PATH,
    "-o", "IdentitiesOnly=yes",
    "-o", f"UserKnownHostsFile={BUILDER_KNOWN_HOSTS}",
    "-o", "StrictHostKeyChecking=yes",
)  # fmt: skip

_KEY_TYPE = re.compile(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)")
_FILE_MARK = "nixpush: file"


def ssh_public_key(private_key: Plaintext) -> str:
    """
    The public key line (``ssh-ed25519 AAAA...``) of an OpenSSH private key, derived on the
    controller by ``ssh-keygen -y`` reading the key from its stdin. Raises ValueError.
    """
    keygen = find_program("ssh-keygen")
    if keygen is None:
        raise ValueError("ssh-keygen is not installed on the controller; install OpenSSH's client")
    # -P "": a passphrase-protected key fails here instead of prompting mid-run.
    result = run_local(
        [keygen, "-y", "-P", "", "-f", "/dev/stdin"], input=private_key.reveal(), timeout=30
    )
    public = result.stdout.strip()
    if result.returncode != 0 or parse_public_key(public) is None:
        # ssh-keygen's stderr describes the format problem, never the key.
        raise ValueError(
            f"{private_key} is not an unencrypted OpenSSH private key ({result.stderr.strip()})"
        )
    return public


def parse_public_key(line: str) -> tuple[str, str] | None:
    """``(type, base64)`` of the first key in an authorized_keys or known_hosts line, or None."""
    tokens = line.split()
    for index, token in enumerate(tokens[:-1]):
        if _KEY_TYPE.fullmatch(token):
            return token, tokens[index + 1]
    return None


def known_hosts_name(hostname: str, port: int = 22) -> str:
    """How known_hosts names a host: ``known_hosts_name("10.0.0.2", 8023) == "[10.0.0.2]:8023"``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


# Facts


@dataclass(frozen=True)
class LineFile:
    """A small text file: its mode, owner, group and lines."""

    mode: int
    owner: str
    group: str
    lines: tuple[str, ...]


class LinesOfFile(FactBase[LineFile | None]):
    """A regular file's ``LineFile``; None when it is missing or not a regular file."""

    @override
    def command(self, path: str) -> StringCommand:
        p = QuoteString(path)
        return StringCommand(
            "if [ -f", p, "]; then echo", QuoteString(_FILE_MARK),
            "&& stat -c '%a %U %G'", p, "&& cat", p, "; fi || true",
        )  # fmt: skip

    @override
    def process(self, output: list[str]) -> LineFile | None:
        if len(output) < 2 or output[0] != _FILE_MARK:
            return None
        mode, owner, group = output[1].split()
        return LineFile(int(mode, 8), owner, group, tuple(output[2:]))


@dataclass(frozen=True)
class Account:
    """A user's home and login shell from the user database."""

    home: str
    shell: str


class UserAccount(FactBase[Account | None]):
    """``Account(home, shell)`` of ``user``; None if there is no such user."""

    @override
    def command(self, user: str) -> StringCommand:
        return StringCommand("getent passwd --", QuoteString(user), "|| true")

    @override
    def process(self, output: list[str]) -> Account | None:
        fields = output[0].split(":") if output else []
        return Account(fields[5], fields[6]) if len(fields) == 7 else None


# Operations


def _line_in_file(
    path: str,
    line: str,
    *,
    present: Callable[[str], bool],
    replaces: Callable[[str], bool],
    owner: str,
    group: str | None,
    mode: int,
    what: str,
) -> Generator[PyinfraCommand, None, None]:
    """Make ``path`` hold ``line`` (lines it ``replaces`` dropped), owned and moded as given."""
    current = host.get_fact(LinesOfFile, path=path)
    lines: Sequence[str] = current.lines if current else ()
    if current is not None and any(present(existing) for existing in lines):
        owner_ok = current.owner == owner and (group is None or current.group == group)
        if owner_ok and current.mode == mode:
            host.noop(f"{path} already {what}")
            return
        if not owner_ok:
            yield chown_file(path, owner, group)
        if current.mode != mode:
            yield chmod_file(path, mode)
        return
    kept = [existing for existing in lines if not replaces(existing)]
    yield write_file(path, "".join(f"{text}\n" for text in (*kept, line)), owner, group, mode)


def _checked_key(key: str) -> tuple[str, str]:
    parsed = parse_public_key(key)
    if parsed is None or any(c in key for c in "\n\r\0"):
        raise OperationError(
            f"{host.name}: {key!r} is not an SSH public key line (type base64 ...)"
        )
    return parsed


@operation()
def authorized_key(user: str, key: str) -> Generator[PyinfraCommand, None, None]:
    """
    Let ``key`` log in as ``user``: one line in ``~user/.ssh/authorized_keys``.

    + user: the account, which must exist
    + key: the public key line, ``ssh-ed25519 AAAA... comment``

    Lines already there are kept; the key counts as present whatever its options or comment.
    ``~/.ssh`` is created 0700 when missing; the file is owned by the user, mode 0600.

    **Example:**

    .. code:: python

        ssh.authorized_key(name="Let the builder push", user="beau", key=deploy_public_key)
    """
    wanted = _checked_key(key)
    account = host.get_fact(UserAccount, user=user)
    if account is None:
        raise OperationError(
            f"{host.name}: user {user!r} does not exist; create it or fix ssh_user"
        )
    ssh_dir = f"{account.home.rstrip('/')}/.ssh"
    if not host.get_fact(Directory, path=ssh_dir):
        yield StringCommand("mkdir -m 0700 --", QuoteString(ssh_dir))
        yield chown_file(ssh_dir, user, None)
    yield from _line_in_file(
        f"{ssh_dir}/authorized_keys",
        key.strip(),
        present=lambda line: parse_public_key(line) == wanted,
        replaces=lambda line: False,
        owner=user,
        group=None,
        mode=0o600,
        what=f"authorizes {wanted[0]} key {wanted[1][-12:]}",
    )


@operation()
def known_host(
    host_pattern: str,
    key: str,
    path: str = BUILDER_KNOWN_HOSTS,
) -> Generator[PyinfraCommand, None, None]:
    """
    Record ``key`` as the host key of ``host_pattern`` in a known_hosts file.

    + host_pattern: how ssh names the host, ``known_hosts_name(hostname, port)``
    + key: the host's public key, ``ssh-ed25519 AAAA...`` (its ``ssh_host_key`` data)
    + path: the known_hosts file (root's, mode 0644)

    A line for the same host and key type with another key is replaced: the inventory's
    ``ssh_host_key`` is the truth.

    **Example:**

    .. code:: python

        ssh.known_host(host_pattern="[192.168.1.122]:8023", key="ssh-ed25519 AAAA...")
    """
    key_type, blob = _checked_key(key)
    if not host_pattern or any(c.isspace() or c in "#\0" for c in host_pattern):
        raise OperationError(f"{host.name}: {host_pattern!r} is not a known_hosts host name")

    def fields(line: str) -> tuple[Any, ...]:
        parts = line.split()
        return (parts[0], parse_public_key(line)) if parts else ((), None)

    yield from _line_in_file(
        path,
        f"{host_pattern} {key_type} {blob}",
        present=lambda line: fields(line) == (host_pattern, (key_type, blob)),
        replaces=lambda line: (
            fields(line)[0] == host_pattern and (fields(line)[1] or ("",))[0] == key_type
        ),
        owner="root",
        group="root",
        mode=0o644,
        what=f"knows {host_pattern}'s {key_type} key",
    )


@dataclass(frozen=True)
class BuilderTrust:
    """What a target trusts of its builder, derived from the builder's secrets in memory."""

    ssh_public_key: str  # of the deploy key, for the target user's authorized_keys
    nix_public_key: str  # of the signing key, for the target's trusted-public-keys


def builder_trust(builder: Host, for_host: str) -> BuilderTrust:
    """
    The public halves of ``builder``'s deploy key (``DEPLOY_KEY_PATH``) and Nix signing key
    (``SIGNING_KEY_PATH``), computed on the controller from their decrypted values. Raises
    ``SecretError`` naming ``for_host``, the secret and the fix.

    + builder: the target's builder, ``inventory.get_host(spec.builder_host)``
    + for_host: the target's name, for messages
    """
    deploy, deploy_value = builder_secret(builder, DEPLOY_KEY_PATH, for_host)
    signing, signing_value = builder_secret(builder, SIGNING_KEY_PATH, for_host)
    try:
        ssh_key = ssh_public_key(deploy_value)
    except ValueError as e:
        raise SecretError(
            for_host,
            f"{deploy.label} (on {builder.name})",
            str(e),
            "store an OpenSSH ed25519 private key there (ssh-keygen -t ed25519 -N '')",
        ) from None
    try:
        nix_key = nix_public_key(signing_value)
    except ValueError as e:
        raise SecretError(
            for_host,
            f"{signing.label} (on {builder.name})",
            str(e),
            "store a key from `nix key generate-secret --key-name NAME` there",
        ) from None
    return BuilderTrust(ssh_key, nix_key)
