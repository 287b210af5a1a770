"""
The end of a deploy run: one line per host (unchanged / deployed / failed with its cause),
and an exit code that counts only the hosts the deploy acts on.

When ``NIXPUSH_REPORT_FILE`` is set (``nixpush-run`` sets it), the same outcomes are also
written there as JSON at exit, with each target's store paths: see ``RunSummary.report``.

pyinfra connects to every inventory host before any deploy code runs; a desktop that is asleep
fails that step. ``RunSummary.forgive`` takes such bystanders (hosts this deploy neither targets
nor builds on) off pyinfra's failed list, so they neither fail the run nor stop it, and
``RunSummary.excuse_offline`` does the same for hosts whose data allows it (``offline_ok``: the
laptop), reported ``offline``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinfra import logger
from pyinfra.api.state import State, StateStage

from operations.core.boot import describe
from operations.core.files import write_atomically

if TYPE_CHECKING:
    from collections.abc import Iterable

    from operations.core.models import ImagePlan, Plan

REPORT_FILE_ENV = "NIXPUSH_REPORT_FILE"


@dataclass
class RunSummary:
    """What happened to each host in one run; printed when the run exits."""

    state: State
    plans: dict[str, Plan] = field(default_factory=dict)
    causes: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    forgiven: set[str] = field(default_factory=set)
    # Hosts that failed to connect, as seen at prepare time: at exit pyinfra has disconnected
    # every host, so ``host.connected`` no longer tells them from hosts whose operation failed.
    unreachable: set[str] = field(default_factory=set)
    flakes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # safe switching (operations/activation.py): hosts that rolled back, with the cause.
    rollbacks: dict[str, str] = field(default_factory=dict)
    # Activation waves (operations/push/waves.py): hosts held because an earlier wave failed.
    held_back: dict[str, str] = field(default_factory=dict)
    # offline_ok hosts that could not be reached: neither deployed nor failed.
    offline: set[str] = field(default_factory=set)
    # deploys/image.py: each image's plan, and what was done (store path, size, copy).
    images: dict[str, ImagePlan] = field(default_factory=dict)
    images_done: dict[str, str] = field(default_factory=dict)
    # A builder's pool (operations/builder/pool.py): the machine that built each target's
    # system (the builder's name or a member's), and the members a build could not use.
    built_on: dict[str, str] = field(default_factory=dict)
    skipped_members: dict[str, dict[str, str]] = field(default_factory=dict)
    # Targets whose new system needs a reboot to be fully in effect: what differs (empty: none).
    reboots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Hosts reached by an address other than their first (``ssh_hostname`` a list): which.
    via: dict[str, str] = field(default_factory=dict)
    # Hosts with several addresses that answered on none: every address tried, in order.
    tried: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The flake revision (or narHash) each target's system comes from this run.
    revisions: dict[str, str] = field(default_factory=dict)
    # Checks: targets switched outside nixpush since it last deployed them (the finding).
    outside: dict[str, str] = field(default_factory=dict)
    # Targets rebooted into their new system after a confirmed switch (``reboot`` data).
    rebooted_hosts: set[str] = field(default_factory=set)

    @property
    def wants_report(self) -> bool:
        """Whether a machine-readable report was asked for (worth extra lookups, e.g. flakes)."""
        return bool(os.environ.get(REPORT_FILE_ENV))

    def flake_seen(self, ref: str, metadata: dict[str, Any]) -> None:
        self.flakes[ref] = metadata

    def planned(self, plan: Plan) -> None:
        self.plans[plan.target] = plan
        if plan.reboot_changes is not None:
            self.reboots[plan.target] = plan.reboot_changes

    def reboot_needed(self, host_name: str, changes: tuple[str, ...]) -> None:
        """What only a reboot of the host brings into effect (empty: nothing), once known."""
        self.reboots[host_name] = changes

    def deployed_from(self, host_name: str, revision: str) -> None:
        """The host's system comes from the flake at ``revision`` (git revision or narHash)."""
        self.revisions[host_name] = revision

    def changed_outside(self, host_name: str, finding: str) -> None:
        """A check found the host running another system than nixpush last deployed there."""
        self.outside[host_name] = finding

    def reached_via(self, host_name: str, address: str) -> None:
        """The host answered on ``address``, not on its first address."""
        self.via[host_name] = address

    def tried_addresses(self, host_name: str, addresses: tuple[str, ...]) -> None:
        """The host answered on none of ``addresses`` (its failure, unless excused, names them)."""
        self.tried[host_name] = addresses

    def rebooted(self, host_name: str) -> None:
        """The host rebooted into its new system and passed its checks: nothing more needed."""
        self.rebooted_hosts.add(host_name)
        self.reboots[host_name] = ()

    def fail(self, host_name: str, cause: str) -> None:
        self.causes.setdefault(host_name, cause)

    def built(self, host_name: str, machine: str) -> None:
        """``machine`` built the host's system this run."""
        self.built_on[host_name] = machine

    def pool_skipped(self, builder: str, member: str, why: str) -> None:
        """Nix could not build on ``builder``'s pool member ``member`` this run."""
        self.skipped_members.setdefault(builder, {}).setdefault(member, why)

    def rolled_back(self, host_name: str, cause: str) -> None:
        """The host is back on its previous system (pyinfra counts it failed: exit 1)."""
        self.rollbacks[host_name] = cause

    def held(self, host_name: str, cause: str) -> None:
        """The host was not activated: an earlier wave failed (pyinfra counts it failed:
        exit 1)."""
        self.held_back[host_name] = cause

    def skip(self, host_name: str, reason: str) -> None:
        self.skipped[host_name] = reason

    def forgive(self, needed: Iterable[str]) -> None:
        """Drop unreachable hosts that this run does not need from pyinfra's failed hosts."""
        wanted = set(needed)
        for host in list(self.state.failed_hosts):
            if host.name not in wanted and not host.connected:
                self.state.failed_hosts.discard(host)
                self.forgiven.add(host.name)
                logger.warning(f"    [{host.name}] unreachable, but this deploy does not need it")

    def excuse_offline(self, allowed: Iterable[str]) -> None:
        """Drop unreachable hosts whose data allows it (``offline_ok``) from pyinfra's failed
        hosts: they are ``offline``, and the run goes on without failing."""
        excused = set(allowed)
        for host in list(self.state.failed_hosts):
            if host.name in excused and not host.connected:
                self.state.failed_hosts.discard(host)
                self.offline.add(host.name)
                logger.warning(f"    [{host.name}] unreachable, offline_ok: not deployed this run")

    def image_planned(self, plan: ImagePlan) -> None:
        self.images[plan.name] = plan

    def image_done(self, name: str, detail: str) -> None:
        self.images_done[name] = detail

    def outcomes(self) -> dict[str, tuple[str, str]]:
        """Host -> (status, detail): unchanged, deployed, rolled-back, held, failed, planned,
        drifted (a check: switched outside nixpush), offline, skipped."""
        executed = self.state.current_stage >= StateStage.Execute
        failed = {host.name for host in self.state.failed_hosts}
        result: dict[str, tuple[str, str]] = {}
        for host in self.state.inventory:
            name = host.name
            plan = self.plans.get(name)
            image = self.images.get(name)
            if name in self.rollbacks and name not in self.causes:
                result[name] = ("rolled-back", self.rollbacks[name])
            elif name in self.held_back and name not in self.causes:
                result[name] = ("held", self.held_back[name])
            elif name in self.offline:
                result[name] = ("offline", "unreachable, and offline_ok: not deployed this run")
            elif name in failed or name in self.causes:
                cause = self.causes.get(name) or (
                    "an operation failed" if name not in self.unreachable
                    else f"could not connect (tried {', '.join(self.tried[name])})"
                    if name in self.tried else "could not connect"
                )  # fmt: skip
                result[name] = ("failed", cause)
            elif name in self.forgiven and plan is None:
                result[name] = ("skipped", "unreachable, not needed by this deploy")
            elif image is not None:
                result[name] = _image_outcome(image, executed, self.images_done.get(name))
            elif plan is None:
                if name in self.skipped:
                    result[name] = ("skipped", self.skipped[name])
            elif plan.up_to_date:
                result[name] = ("unchanged", plan.noop_reason)
            elif not executed:
                result[name] = (
                    "planned",
                    f"would {plan.action} {plan.desired} (now {plan.current})",
                )
            else:
                machine = self.built_on.get(name)
                via = f" (built on {machine})" if machine and machine != plan.builder else ""
                rebooted = "; rebooted into it" if name in self.rebooted_hosts else ""
                result[name] = ("deployed", f"{plan.action} {plan.desired}{via}{rebooted}")
            if name not in result:
                continue
            status, detail = result[name]
            reboot_note = describe(self.reboots[name]) if self.reboots.get(name) else None
            if name in self.outside and status in ("unchanged", "planned"):
                # Drift of its own kind: someone switched the host without nixpush.
                finding = self.outside[name]
                detail = finding if status == "unchanged" else f"{detail}; {finding}"
                status = "drifted" if status == "unchanged" else status
            if reboot_note and status in ("deployed", "unchanged", "planned", "drifted"):
                detail = f"{detail}; {reboot_note}"
            if name in self.via:
                detail = f"{detail}; via {self.via[name]}"
            result[name] = (status, detail)
        return result

    def report(self) -> dict[str, Any]:
        """
        The outcomes as JSON-ready data: per host in the run its status and cause and, for a
        target that was planned, its action and current, profile and desired store paths
        (None: nothing there). ``flakes``: what the builders resolved each flake to.
        """
        hosts: dict[str, dict[str, Any]] = {}
        outcomes = self.outcomes()
        for host in self.state.inventory:
            # A host the deploy acted on without a nixpush outcome (deploys/nas.py's): nothing
            # failed; whether pyinfra changed it is in pyinfra's own results.
            if host.name not in outcomes and self.state.is_host_in_limit(host):
                outcomes[host.name] = ("unchanged", "")
        for name, (status, detail) in outcomes.items():
            entry: dict[str, Any] = {"status": status, "cause": detail}
            plan = self.plans.get(name)
            if plan is not None:
                entry.update(
                    action=plan.action,
                    current=plan.current,
                    profile=plan.profile,
                    desired=plan.desired,
                )
                if name in self.built_on:
                    entry["built_on"] = self.built_on[name]
            if name in self.via:
                entry["address"] = self.via[name]
            if name in self.revisions:
                entry["revision"] = self.revisions[name]
            if name in self.reboots:
                entry.update(
                    reboot_required=bool(self.reboots[name]),
                    reboot_changes=list(self.reboots[name]),
                )
            if name in self.rebooted_hosts:
                entry["rebooted"] = True
            hosts[name] = entry
        return {
            "executed": self.state.current_stage >= StateStage.Execute,
            "hosts": hosts,
            "flakes": self.flakes,
            # builder -> pool member -> why Nix could not build on it this run
            "skipped_members": self.skipped_members,
        }

    def write_report(self) -> None:
        """Write ``report()`` to ``$NIXPUSH_REPORT_FILE``, if set (atomically: temp + rename)."""
        path = os.environ.get(REPORT_FILE_ENV)
        if not path:
            return
        write_atomically(Path(path), json.dumps(self.report(), indent=2, sort_keys=True))

    def lines(self) -> list[str]:
        return [
            # "rolled-back" reads "rolled back" here; the report keeps the token.
            f"{name}: {status.replace('-', ' ')}: {detail}"
            for name, (status, detail) in self.outcomes().items()
        ] + [
            f"{builder}: pool member {member} skipped: {why}"
            for builder, members in self.skipped_members.items()
            for member, why in members.items()
        ]

    def print(self) -> None:
        lines = self.lines()
        if lines:
            print("--> nixpush summary:", file=sys.stderr)
            for line in lines:
                print(f"    {line}", file=sys.stderr)


def _image_outcome(image: ImagePlan, executed: bool, done: str | None) -> tuple[str, str]:
    if image.up_to_date:
        return ("unchanged", done or image.noop_reason)
    if not executed:
        return ("planned", f"would {image.todo}")
    return ("deployed", done or image.path)
