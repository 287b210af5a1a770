"""
What every deploy does first, in one call: check the fleet's data (a broken inventory stops
the run before anything connects on), bound the SSH sessions nixpush opens on each host's
connection (``max_ssh_sessions``), and open the run summary, which prints one line per host
when the run exits (and writes ``$NIXPUSH_REPORT_FILE`` for ``nixpush-run``); unreachable hosts
whose data says ``offline_ok`` are reported ``offline`` instead of failing the run.

.. code:: python

    from pyinfra import host, state
    from operations.start import start_deploy

    deploy = start_deploy(state)
    spec = deploy.specs[host.name]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from operations.fleet import HostSpec, check_fleet
from operations.process import limit_sessions
from operations.summary import RunSummary, summary_for

if TYPE_CHECKING:
    from pyinfra.api.state import State


@dataclass(frozen=True)
class Deploy:
    """The checked fleet and the run's summary."""

    specs: dict[str, HostSpec]
    summary: RunSummary


def start_deploy(state: State) -> Deploy:
    """Check the fleet, bound each host's SSH sessions, open the run summary (idempotent:
    deploy code runs once per host)."""
    specs = check_fleet(state.inventory)
    for inventory_host in state.inventory:
        limit_sessions(inventory_host, specs[inventory_host.name].max_ssh_sessions)
    summary = summary_for(state)
    # A host that may be asleep (offline_ok) is offline, not failed, in every deploy.
    summary.excuse_offline(name for name, spec in specs.items() if spec.offline_ok)
    return Deploy(specs, summary)
