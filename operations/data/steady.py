"""
What a host *is*, which no operation of a run changes, read once per host per run and in one
command: whether it runs NixOS (``/etc/NIXOS``), whether systemd runs it
(``/run/systemd/system``).

pyinfra keeps no fact cache: every ``host.get_fact`` is a command on the host (a new SSH
session, and sudo when the host's data asks for it), and several operations of one run ask
these same questions of every target. Both paths are world-readable: no sudo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.context import ctx_host
from typing_extensions import override

from operations.core.models import NIXOS_MARKER, SYSTEMD_RUNNING
from operations.core.process import read_lines_on
from operations.core.runstate import current_run

if TYPE_CHECKING:
    from pyinfra.api.host import Host

T = TypeVar("T")


class HostKind(FactBase[frozenset[str]]):
    """``nixos`` when ``/etc/NIXOS`` exists, ``systemd`` when systemd runs the host."""

    @override
    def command(self) -> StringCommand:
        return StringCommand(
            "if [ -e", QuoteString(NIXOS_MARKER), "] || [ -L", QuoteString(NIXOS_MARKER), "];",
            "then echo nixos; fi;",
            "if [ -d", QuoteString(SYSTEMD_RUNNING), "]; then echo systemd; fi",
        )  # fmt: skip

    @staticmethod
    def default() -> frozenset[str]:
        return frozenset()

    @override
    def process(self, output: list[str]) -> frozenset[str]:
        return frozenset(line.strip() for line in output) & {"nixos", "systemd"}


def host_kind() -> frozenset[str]:
    """The current host's ``HostKind``, read once per host per run (kept on the run)."""
    target = ctx_host.get()  # type: ignore[no-untyped-call]  # the Host, not the proxy
    kinds = current_run().host_kinds
    if target.name not in kinds:
        kinds[target.name] = target.get_fact(HostKind, _sudo=False)
    return kinds[target.name]


def read_with_host_kind(target: Host, fact: type[FactBase[T]], *, doing: str) -> T:
    """
    Read ``fact`` (world-readable: no sudo) on ``target`` and its ``HostKind`` in one command;
    the kind is kept for ``host_kind``: a read the run makes anyway brings it along.
    ``DeployFailed`` as ``read_on``.
    """
    instance, kind = fact(), HostKind()
    command = StringCommand(instance.command(), ";", kind.command())
    lines = read_lines_on(target, command, sudo=False, doing=doing)
    current_run().host_kinds[target.name] = kind.process(lines)
    return instance.process(lines) if lines else instance.default()


def known_nixos(target: Any) -> bool:
    """Whether ``target`` (a Host) is known to run NixOS: its kind was read this run. For
    advice after a step failed, where reading the host again is not worth a round trip."""
    return "nixos" in current_run().host_kinds.get(target.name, frozenset())


def runs_nixos() -> bool:
    """Whether the current host is NixOS, whose /etc is generated and must not be written."""
    return "nixos" in host_kind()


def runs_systemd() -> bool:
    """Whether systemd runs the current host."""
    return "systemd" in host_kind()
