"""
What every deploy does first, in one call: check the fleet's data and every host's
``secrets`` entries (a broken inventory stops the run before anything connects on), take
nixpush-run's lock (``operations.core.lock``: a deploy by hand never overlaps a scheduled run),
bound the SSH sessions nixpush opens on each host's connection (``max_ssh_sessions``), and open
the run summary, which prints one line per host when the run exits (and writes
``$NIXPUSH_REPORT_FILE`` for ``nixpush-run``), and the run's ``RunCache``, which the push
steps share. Unreachable hosts whose data says ``offline_ok`` are reported ``offline``
instead of failing the run. Every target in ``--limit`` that activates is expected in its
activation wave before any host is planned (``expect_waves``).

.. code:: python

    from pyinfra import host, state
    from operations.push import plan
    from operations.push.start import start_deploy

    deploy = start_deploy(state)
    spec = deploy.specs[host.name]
    plan.reach_builder(host, spec, deploy.cache)  # push steps share the run's cache
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING

from operations.core.lock import hold_deploy_lock
from operations.core.process import limit_sessions
from operations.core.runstate import run_of, summary_for
from operations.core.summary import RunSummary
from operations.data.fleet import HostSpec, check_fleet
from operations.push.runcache import RunCache
from operations.push.waves import Waves

if TYPE_CHECKING:
    from pyinfra.api.state import State


@dataclass(frozen=True)
class Deploy:
    """The checked fleet, the run's summary, and what the run's push steps learn once and
    share (``RunCache``: every deploy file of a run, every host, prepare and execute time)."""

    specs: dict[str, HostSpec]
    summary: RunSummary
    cache: RunCache


def register_deploy_file(filename: str) -> types.ModuleType:
    """
    Make the deploy file pyinfra runs (``exec``, never imported) known as a module.

    pyinfra orders every operation call by ``inspect.stack()``, which looks up the module of
    each frame. For a file no module comes from, the standard library finds none and scans
    all of ``sys.modules`` again, every time: 15 ms of CPU per operation call, on a controller
    running 10 hosts' deploy code one greenlet at a time (half its CPU in a no-change run of 8
    Pis). A module in ``sys.modules`` whose ``__file__`` is the deploy file ends that: the
    first lookup finds it and ``inspect`` remembers the file. Nothing imports it.
    """
    path = os.path.abspath(filename)
    name = "nixpush_deploy_file_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    if name not in sys.modules:
        module = types.ModuleType(name, f"pyinfra's deploy file {filename}, for inspect only")
        module.__file__ = path
        sys.modules[name] = module
    return sys.modules[name]


def start_deploy(state: State) -> Deploy:
    """Check the inventory, take the run lock, bound each host's SSH sessions, open the run
    summary. Deploy code runs once per host: the first call does this work, the others get
    its ``Deploy`` (checking the fleet costs CPU, and every greenlet waits while one spends it)."""
    if state.current_deploy_filename:  # each deploy file of the run, before any operation
        register_deploy_file(state.current_deploy_filename)
    run = run_of(state)
    if isinstance(run.deploy, Deploy):
        return run.deploy
    specs = check_fleet(state.inventory)
    hold_deploy_lock()
    for inventory_host in state.inventory:
        limit_sessions(inventory_host, specs[inventory_host.name].max_ssh_sessions)
    summary = summary_for(state)
    # A host that may be asleep (offline_ok) is offline, not failed, in every deploy.
    summary.excuse_offline(name for name, spec in specs.items() if spec.offline_ok)
    note_addresses(specs, summary)
    deploy = Deploy(specs, summary, RunCache(specs))
    run.deploy = deploy
    expect_waves(state, specs, summary, deploy.cache.waves)
    return deploy


def note_addresses(specs: dict[str, HostSpec], summary: RunSummary) -> None:
    """For hosts with several addresses (``choose_addresses`` tried them before pyinfra
    connected): which one was used when it was not the first, or every address tried when
    none answered (an ``offline_ok`` host is ``offline`` instead)."""
    for name, spec in specs.items():
        addresses = spec.ssh_addresses
        if len(addresses) < 2 or spec.ssh_hostname is None:
            continue
        if name in summary.unreachable:
            summary.tried_addresses(name, addresses)
        elif spec.ssh_hostname != addresses[0]:
            summary.reached_via(name, spec.ssh_hostname)


def expect_waves(
    state: State, specs: dict[str, HostSpec], summary: RunSummary, waves: Waves
) -> None:
    """Expect every activating target in ``--limit`` in its wave, from the parsed inventory:
    pyinfra runs no deploy code for a host it could not connect to, so a canary that is down
    would otherwise be in no wave, and the later waves would activate at once. One that could
    not connect has failed its wave already; an ``offline_ok`` one that is away holds none."""
    for inventory_host in state.inventory:
        spec = specs[inventory_host.name]
        if not (spec.is_target and spec.deploy_action.activates):
            continue
        if not state.is_host_in_limit(inventory_host):
            continue
        waves.expect(spec.name, spec.deploy_wave)
        if spec.name in summary.offline:
            waves.excuse(spec.name)
        elif spec.name in summary.unreachable:
            waves.report(spec.name, f"{spec.name} could not connect")
