"""
A builder's pool: other machines its Nix sends derivations to, through Nix's own build hook.

The builder (``remote_builders`` in its data) keeps evaluating and starting every build of a
deploy, one ``nix build`` as before; Nix's build hook hands each derivation to a member that
offers its system and has a free slot (the highest ``speed_factor`` first), and builds it
locally only when no member can take it (where its own ``max-jobs`` and platforms allow). So a
member that builds aarch64 natively takes those builds from the NAS's emulation, and a member
that is down costs a failed connection, not the deploy.

Builder side (``deploys/nas.py``): per member an ``ssh_config.d`` alias (the ``ssh-ng://`` URL
has no port) and a line in ``/etc/nix/machines`` (the member's offered systems, ``nix_max_jobs``,
``speed_factor``, ``builder_features`` and its pinned ``ssh_host_key``), ``builders =
@/etc/nix/machines`` in nix.conf. Its client key is a secret in its data at ``POOL_KEY_PATH``.

Member side: the restricted account ``POOL_USER`` (``nix-daemon --stdio`` and nothing else,
the builder's key authorized), trusted by its Nix, as for pull builds (``operations.builder.pull``).

.. code:: python

    [m.machines_line() for m in pool_machines(specs, "nas")]
    # ["ssh-ng://nix-ssh@nixpush-builder-bld aarch64-linux /root/.ssh/nixpush_pool 4 2
    #   nixos-test,benchmark,big-parallel - c3NoLWVk..."]
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyinfra.api.command import PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.builder.nix import MACHINES_FILE
from operations.builder.pull import (
    PULL_FEATURES,
    BuildMachine,
    builder_alias,
    client_keys_by_user,
)
from operations.core.failures import fail_host, require_root
from operations.core.files import LinesOfFile, SecretFile, lines_in_file
from operations.data.fleet import FleetError, HostSpec, pool_members
from operations.trust.keys import POOL_KEY_PATH, pool_client_key

if TYPE_CHECKING:
    pass

# The account a pool member serves its builder as: NixOS's nix.sshServe account is always this
# one, so Debian members use it too.
POOL_USER = "nix-ssh"


def pool_machine(builder: HostSpec, member: HostSpec) -> BuildMachine:
    """``builder``'s view of ``member``, or ``FleetError`` naming the member and the bad value
    (the data checks already made sure its address and host key are set)."""
    if member.ssh_hostname is None or member.ssh_host_key is None:
        raise FleetError(
            [f"{member.name}: ssh_hostname and ssh_host_key are needed to build for {builder.name}"]
        )
    try:
        return BuildMachine(
            alias=builder_alias(member.name),
            hostname=member.ssh_hostname,
            port=member.ssh_port,
            user=POOL_USER,
            systems=member.offered_systems,
            max_jobs=member.nix_max_jobs or 1,
            host_key=" ".join(member.ssh_host_key.split()[:2]),
            key_path=POOL_KEY_PATH,
            features=member.builder_features or PULL_FEATURES,
            speed_factor=member.speed_factor,
        )
    except ValueError as e:
        raise FleetError([f"{member.name}: as a remote builder of {builder.name}: {e}"]) from None


def pool_machines(specs: Mapping[str, HostSpec], builder: str) -> list[BuildMachine]:
    """The machines of ``builder``'s pool, in its ``remote_builders`` order."""
    spec = specs[builder]
    return [pool_machine(spec, specs[name]) for name in spec.remote_builders]


def builders_of(specs: Mapping[str, HostSpec], member: str) -> list[str]:
    """The builders whose pool ``member`` is in, in inventory order."""
    return [name for name, spec in specs.items() if member in spec.remote_builders]


def is_pool_member(specs: Mapping[str, HostSpec], name: str) -> bool:
    return name in pool_members(specs)


def served_keys(specs: Mapping[str, HostSpec], member: str) -> dict[str, list[str]]:
    """
    What ``member``'s restricted accounts authorize: the client keys of the targets pulling
    from it (``builder_user``) and, for ``POOL_USER``, of the builders whose pool it is in
    (``pool_client_key``, derived on the controller from sops). ``SecretError`` naming the fix.
    """
    keys = client_keys_by_user(specs, member)
    for builder in builders_of(specs, member):
        key = pool_client_key(specs, builder, member)
        keys.setdefault(POOL_USER, []).append(key)
    return keys


def _alias_of(line: str) -> str | None:
    """The ssh alias of a machines line's ``ssh-ng://user@alias`` URI."""
    uri = line.split()[0] if line.split() else ""
    match = re.fullmatch(r"ssh(?:-ng)?://(?:[^@/]+@)?([^/?]+)", uri)
    return match.group(1) if match else None


@dataclass(frozen=True)
class PoolFile:
    """What a builder's machines file should hold: ``machines``, and no other line nixpush
    wrote for a pool (an ``ssh-ng://...@nixpush-builder-<host>`` line), except for ``keep``
    (the alias of the builder's own builder, when it pulls: ``deploys/pull.py``'s line)."""

    machines: tuple[BuildMachine, ...]
    keep: frozenset[str] = frozenset()

    def lines(self, current: Sequence[str]) -> list[str]:
        def foreign(line: str) -> bool:
            alias = _alias_of(line)
            return alias is None or not alias.startswith(_PREFIX) or alias in self.keep

        kept = [line for line in current if line.strip() and foreign(line)]
        return [*kept, *(m.machines_line() for m in self.machines)]


_PREFIX = builder_alias("")


def pool_file(specs: Mapping[str, HostSpec], builder: str) -> PoolFile:
    """``builder``'s ``PoolFile``."""
    own = specs[builder].builder_host
    keep = frozenset({builder_alias(own)} if own not in (None, builder) else ())
    return PoolFile(tuple(pool_machines(specs, builder)), keep)


@operation()
def pool_machines_file(
    pool: PoolFile, machines_file: str = MACHINES_FILE
) -> Generator[PyinfraCommand, None, None]:
    """
    The builder's pool in Nix's machines file: one line per member, no line for a host no
    longer in ``remote_builders``; lines nixpush did not write are kept.

    + pool: ``pool_file(specs, builder)``
    + machines_file: path of the machines file

    The client key must already be installed at ``POOL_KEY_PATH`` (``deploys/secrets.py``):
    without it the host fails, since every remote build would.

    **Example:**

    .. code:: python

        pool.pool_machines_file(pool=pool_file(specs, "nas"))
    """
    require_root(f"{machines_file} belongs to root")
    current = host.get_fact(LinesOfFile, path=machines_file)
    lines = list(current.lines) if current else []
    wanted = pool.lines(lines)
    if pool.machines:
        key = host.get_fact(SecretFile, path=POOL_KEY_PATH)
        if key is None or not key.regular:
            yield fail_host(
                f"{host.name}: the pool client key {POOL_KEY_PATH} is missing; install it with "
                "deploys/secrets.py first (a secret with that dest in its data)"
            )
            return
    elif current is None:
        host.noop(f"{host.name} has no pool and no {machines_file}")
        return
    names = ", ".join(m.alias for m in pool.machines) or "no pool member"
    yield from lines_in_file(
        machines_file, wanted, current, owner="root", group="root", mode=0o644,
        what=f"lists {names}",
    )  # fmt: skip
