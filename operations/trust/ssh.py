"""SSH trust between hosts: a user's ``authorized_keys`` and a ``known_hosts`` file, one line each.

The builder pushes to targets as root with the deploy key from sops (``DEPLOY_KEY_PATH``),
verifying each target against ``BUILDER_KNOWN_HOSTS``:

.. code:: python

    ssh -i /root/.nixpush/deploy_ed25519 -o IdentitiesOnly=yes \\
        -o UserKnownHostsFile=/root/.nixpush/known_hosts -o StrictHostKeyChecking=yes ...
"""

from __future__ import annotations

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

from operations.core.files import LineFile, LinesOfFile, as_account, lines_in_file
from operations.core.nixos_advice import NIXOS_AUTHORIZED_KEYS_DIR
from operations.data.steady import runs_nixos
from operations.trust.keys import DEPLOY_KEY_PATH, parse_public_key

if TYPE_CHECKING:
    pass

BUILDER_KNOWN_HOSTS = "/root/.nixpush/known_hosts"
# ssh options for pushing from the builder (as root) to a target.
SSH_OPTIONS = (
    "-i", DEPLOY_KEY_PATH,
    "-o", "IdentitiesOnly=yes",
    "-o", f"UserKnownHostsFile={BUILDER_KNOWN_HOSTS}",
    "-o", "StrictHostKeyChecking=yes",
)  # fmt: skip


def known_hosts_name(hostname: str, port: int = 22) -> str:
    """How known_hosts names a host: ``known_hosts_name("10.0.0.2", 8023) == "[10.0.0.2]:8023"``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


# Facts


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


def user_account(user: str) -> Account | None:
    """The current host's ``UserAccount`` of ``user``, read without sudo: the account database
    is world-readable, and a sudo costs the host a PAM session per read."""
    return host.get_fact(UserAccount, user=user, _sudo=False)


# Operations


def _line_in_file(
    path: str,
    line: str,
    current: LineFile | None,
    *,
    present: Callable[[str], bool],
    replaces: Callable[[str], bool],
    owner: str,
    group: str | None,
    mode: int,
    what: str,
    as_user: str | None = None,
) -> Generator[PyinfraCommand, None, None]:
    """Make ``path`` (now ``current``, its ``LinesOfFile``) hold ``line`` (lines it
    ``replaces`` dropped), owned and moded as given; written as ``as_user`` when given (see
    ``lines_in_file``)."""
    lines: Sequence[str] = current.lines if current else ()
    if current is None or not any(present(existing) for existing in lines):
        lines = [*(existing for existing in lines if not replaces(existing)), line]
    yield from lines_in_file(
        path, lines, current, owner=owner, group=group, mode=mode, what=what, as_user=as_user
    )


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
    ``~/.ssh`` is created 0700 when missing; the file is owned by the user, mode 0600. Both
    are read and written as the user (``runuser``): root never follows a link in them. On
    NixOS, a key its configuration authorizes (``/etc/ssh/authorized_keys.d/<user>``, from the
    generated fragment) is left there.

    **Example:**

    .. code:: python

        ssh.authorized_key(name="Let the builder push", user="beau", key=deploy_public_key)
    """
    wanted = _checked_key(key)
    if runs_nixos() and authorized_by_nixos(user, key):
        host.noop(f"{host.name} runs NixOS and its configuration already authorizes the key")
        return
    account = user_account(user)
    if account is None:
        raise OperationError(
            f"{host.name}: user {user!r} does not exist; create it or fix ssh_user"
        )
    ssh_dir = f"{account.home.rstrip('/')}/.ssh"
    path = f"{ssh_dir}/authorized_keys"
    # The user owns ~/.ssh and may put a symlink anywhere in it: read and write as the user.
    current = host.get_fact(LinesOfFile, path=path, as_user=user)
    if current is None and not host.get_fact(Directory, path=ssh_dir):
        yield as_account(user, StringCommand("mkdir -m 0700 --", QuoteString(ssh_dir)))
    yield from _line_in_file(
        path,
        key.strip(),
        current,
        present=lambda line: parse_public_key(line) == wanted,
        replaces=lambda line: False,
        owner=user,
        group=None,
        mode=0o600,
        what=f"authorizes {wanted[0]} key {wanted[1][-12:]}",
        as_user=user,
    )


def authorized_by_nixos(user: str, key: str) -> bool:
    """Whether NixOS's ``users.users.<user>.openssh.authorizedKeys.keys`` holds ``key``."""
    wanted = _checked_key(key)
    generated = host.get_fact(LinesOfFile, path=f"{NIXOS_AUTHORIZED_KEYS_DIR}/{user}")
    return any(parse_public_key(line) == wanted for line in (generated.lines if generated else ()))


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
        host.get_fact(LinesOfFile, path=path),
        present=lambda line: fields(line) == (host_pattern, (key_type, blob)),
        replaces=lambda line: (
            fields(line)[0] == host_pattern and (fields(line)[1] or ("",))[0] == key_type
        ),
        owner="root",
        group="root",
        mode=0o644,
        what=f"knows {host_pattern}'s {key_type} key",
    )
