"""
Who deployed what: after a confirmed switch, the target records the system nixpush deployed,
the flake it came from (with its git revision or narHash), nixpush's own revision, the
controller's host name, the time and the action, in a root-only file outside ``/etc``
(``/var/lib/nixpush/deployed.json``: the directory 0700, the file 0600, written to a temporary
file and renamed over the old one, so a reader finds the old record or the new one, whole).

A check (``--dry``, what ``nixpush-run check`` runs) reads it back, with sudo, in one round
trip: when the running system is not the one nixpush last deployed there, someone switched the
host without nixpush (``nixos-rebuild switch``, ``just deploy-pi4``), which is drift of its own
kind: ``changed outside nixpush: runs X, nixpush deployed Y``. A host nixpush never recorded is
no finding. A deploy does not read it (a no-change run costs nothing more).

.. code:: python

    record = provenance.record_for(spec, plan, metadata)
    provenance.record_deployment(plan=plan, record=record, sudo=spec.sudo)
"""

from __future__ import annotations

import datetime
import functools
import json
import socket
from collections.abc import Generator, Mapping, Sequence
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.core.failures import fail, host_step
from operations.core.lock import is_dry_run
from operations.core.models import Action, Builder, Plan
from operations.core.process import run_local, run_on
from operations.data.fleet import DEFAULT_PROVENANCE_FILE as PROVENANCE_FILE
from operations.push.plan import flake_metadata

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

    from operations.data.fleet import HostSpec
    from operations.push.start import Deploy

# Writes stdin to "$1" atomically: a temporary file beside it (same filesystem), then rename.
# The file is root's alone (umask 077: 0600), and so is a directory made for it; one already
# there is left as it is (/var/lib/nixpush may be nixpush-run's state directory too).
_WRITE = 'umask 077 && mkdir -p "$(dirname "$1")" && cat > "$1.new" && mv -f "$1.new" "$1"'
# Reads "$1" if it is there; a line saying it is not, else (so no answer is taken for "none").
_READ = 'if [ -e "$1" ]; then cat "$1"; else echo nixpush-no-record; fi'
_NO_RECORD = "nixpush-no-record"


def write_command(path: str = PROVENANCE_FILE) -> StringCommand:
    """``sh -c`` writing the record on stdin to ``path`` atomically, root-only."""
    return StringCommand("sh", "-c", QuoteString(_WRITE), "nixpush-record", QuoteString(path))


def read_command(path: str = PROVENANCE_FILE) -> StringCommand:
    """``sh -c`` printing the record at ``path``, or ``nixpush-no-record``."""
    return StringCommand("sh", "-c", QuoteString(_READ), "nixpush-record", QuoteString(path))


def parse_record(lines: Sequence[str]) -> dict[str, Any] | None:
    """The record ``read_command`` printed, or None (none, or not one nixpush wrote)."""
    text = "\n".join(lines).strip()
    if not text or text == _NO_RECORD:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("system"), str) else None


@functools.cache
def nixpush_revision() -> str:
    """This nixpush's revision as ``nixpush-run``'s report names it (``git describe --always
    --dirty`` of the checkout), else its package version: read once per process."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / ".git").exists():
        result = run_local(
            ["git", "-C", str(checkout), "describe", "--always", "--dirty"], timeout=10
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    try:
        return package_metadata.version("nixpush")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def flake_revision(flake: Mapping[str, Any]) -> str | None:
    """The flake's git revision, else its narHash (a path or a dirty tree has no revision)."""
    for key in ("revision", "narHash"):
        value = flake.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def record_for(spec: HostSpec, plan: Plan, flake: Mapping[str, Any]) -> dict[str, Any]:
    """What the target will record (the time is added when it is written); ``flake``: what
    the builder resolved the flake to (``plan.flake_metadata``)."""
    return {
        "system": plan.desired,
        "action": str(plan.action),
        "flake": spec.flake,
        "flake_revision": flake.get("revision"),
        "flake_nar_hash": flake.get("narHash"),
        "configuration": spec.nixos_config,
        "nixpush_revision": nixpush_revision(),
        "controller": socket.gethostname(),
    }


def records(plan: Plan) -> bool:
    """Whether the plan's activation leaves a record: a switch (or a rollback's) to a new
    system; ``boot``, ``test`` and ``build`` do not change what runs for good."""
    return not plan.up_to_date and plan.action in (Action.SWITCH, Action.ROLLBACK)


@operation(is_idempotent=False)
def record_deployment(
    plan: Plan, record: Mapping[str, Any], sudo: bool, path: str = PROVENANCE_FILE
) -> Generator[PyinfraCommand, None, None]:
    """
    After a confirmed switch, write what was deployed to ``/var/lib/nixpush/deployed.json`` on
    the target (root-only, atomically). A host whose activation failed or rolled back runs no
    later step, so nothing is recorded for it.

    + plan: the target's plan
    + record: ``record_for(spec, plan, flake)``
    + sudo: write it with sudo (a non-root deploy user)
    + path: where (``provenance_file``)

    **Example:**

    .. code:: python

        provenance.record_deployment(plan=plan, record=record, sudo=True)
    """
    if not records(plan):
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: nothing recorded")
        return
    yield FunctionCommand(_record, (dict(record), sudo, path), {})


@host_step
def _record(state: State, host: Host, record: dict[str, Any], sudo: bool, path: str) -> bool:
    doing = f"recording the deployment in {path}"
    stamped = {**record, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    text = json.dumps(stamped, indent=2, sort_keys=True) + "\n"
    ok, lines = run_on(host, write_command(path), sudo=sudo, stdin=text, doing=doing)
    if not ok:
        return fail(host, f"{doing} failed: {lines[-1].strip() if lines else 'no output'}")
    host.log_styled(f"recorded in {path}", log_func=logger.info)
    return True


def outside_change(running: str | None, record: Mapping[str, Any] | None) -> str | None:
    """The drift finding when ``running`` is not what nixpush last recorded, else None."""
    if record is None or running is None or record.get("system") == running:
        return None
    return f"changed outside nixpush: runs {running}, nixpush deployed {record.get('system')}"


def read_record(target: Host, sudo: bool, path: str = PROVENANCE_FILE) -> dict[str, Any] | None:
    """The target's record (deploy code, prepare time), or None when it has none."""
    ok, lines = run_on(target, read_command(path), sudo=sudo, doing=f"reading {path}")
    return parse_record(lines) if ok else None


def check_target(
    target: Host, spec: HostSpec, plan: Plan, builder: Builder | None, deploy: Deploy
) -> None:
    """Deploy code, once the target is planned: the deploy's flake revision for the report
    (known already: planning resolved the flake), and under ``--dry`` whether the target was
    switched outside nixpush since nixpush last deployed it (one round trip, checks only)."""
    summary = deploy.summary
    if builder is not None and spec.flake and (summary.wants_report or not plan.up_to_date):
        revision = flake_revision(flake_metadata(builder, spec.flake, deploy.cache))
        if revision is not None:
            summary.deployed_from(spec.name, revision)
    if is_dry_run() and plan.action.contacts_target and plan.current is not None:
        finding = outside_change(plan.current, read_record(target, spec.sudo, spec.provenance_file))
        if finding is not None:
            summary.changed_outside(spec.name, finding)
            target.log_styled(finding, fg="yellow", log_func=logger.warning)


def record_target(spec: HostSpec, plan: Plan, builder: Builder | None, deploy: Deploy) -> None:
    """After the activation (and pruning): the record of a switch, written only once it was
    confirmed (a host whose activation failed runs no later step)."""
    if not records(plan):
        return
    flake = flake_metadata(builder, spec.flake, deploy.cache) if builder and spec.flake else {}
    record_deployment(
        name="Record what was deployed", plan=plan, record=record_for(spec, plan, flake),
        sudo=spec.sudo, path=spec.provenance_file,
    )  # fmt: skip
