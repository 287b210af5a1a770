"""Checks every nixpush operation makes before it touches a host, and how it fails one host.

pyinfra has no "fail this host" call an operation body can make: an exception raised in an
operation body, at prepare time (change detection) or at execute time, escapes pyinfra's per-host
handling and aborts the whole run for every host (``pyinfra_cli.util._parallel_load_hosts``
re-raises it; at execute time ``operations._run_single_op`` re-raises it from the greenlet).
A yielded ``FunctionCommand`` whose function takes ``state, host`` and returns ``False`` is
pyinfra's own per-host failure: that host is dropped, the others continue. ``fail_host`` builds
that command, and records the cause for the run's summary and report. Bad input (a typo in the
inventory) still raises, so the run stops before any host changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.facts import FactBase
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.facts.server import User
from typing_extensions import override

from operations.summary import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

NIXOS_MARKER = "/etc/NIXOS"


def fail_host(error: OperationError) -> FunctionCommand:
    """A command that, when executed, logs ``error`` for the current host and fails only it."""
    return FunctionCommand(_log_and_fail, (error,), {})


def _log_and_fail(state: State, host: Host, error: OperationError) -> bool:
    host.log_styled(f"Operation error: {error}", fg="red", log_func=logger.error)
    summary_for(state).fail(host.name, str(error))
    return False


def nixos_options_error(host_name: str, options: Sequence[str]) -> OperationError:
    """The error for a NixOS host missing ``options`` (each ``"option = value;"``)."""
    wanted = " and ".join(options)
    return OperationError(
        f"{host_name} runs NixOS: set {wanted} in its configuration, then rebuild it"
    )


def nix_list(values: Sequence[str]) -> str:
    """A Nix list literal of strings: ``nix_list(["a"]) == '[ "a" ]'``."""
    return "[ " + " ".join(json.dumps(value) for value in values) + " ]"


def runs_nixos() -> bool:
    """Whether the current host is NixOS, whose /etc is generated and must not be written."""
    return host.get_fact(File, path=NIXOS_MARKER) is not None


def require_root(why: str) -> None:
    """Raise a clear OperationError unless the operation's commands run as root."""
    user = host.get_fact(User)
    if user != "root":
        raise OperationError(
            f"{host.name}: connected as {user!r}, not root, and {why}; "
            "set _sudo=True in its host or group data",
        )


class LinesFact(FactBase[list[str]]):
    """A fact whose answer is the command's output lines; no output (or a missing command) is
    the empty list. Subclasses give ``command()`` and may filter in ``process()``."""

    @override
    @staticmethod
    def default() -> list[str]:
        return []

    @override
    def process(self, output: list[str]) -> list[str]:
        return output
