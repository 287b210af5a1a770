"""
Planning a push deploy: for one target, reach its builder, check it can build the target's
system, evaluate the desired toplevel there and read what the target runs now.

Called from deploy code (prepare time, once per host). A problem that concerns only this target
(its builder is unreachable, its configuration is missing from the flake) raises
``DeployFailed``; the deploy logs it at once, fails that host, and the others go on.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from gevent.lock import Semaphore
from pyinfra import logger
from pyinfra.api.command import PyinfraCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.operation import operation
from pyinfra.context import host as current_host
from pyinfra.facts.files import File

from operations.fleet import HostSpec
from operations.nix import NixConfig
from operations.nixos import (
    CURRENT_SYSTEM,
    SYSTEM_PROFILE,
    Builder,
    DeployFailed,
    Plan,
    StorePathLink,
    diff_closures,
    evaluate_toplevel,
    flake_metadata,
    is_built,
    toplevel_attr,
)
from operations.preconditions import fail_host
from operations.secrets import DEPLOY_KEY_PATH, SIGNING_KEY_PATH
from operations.summary import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host


_builder_locks: dict[str, Semaphore] = {}
_unreachable_builders: set[str] = set()


def reach_builder(target: Host, spec: HostSpec) -> Builder:
    """The target's builder, connected; ``DeployFailed`` when it cannot be reached."""
    assert spec.builder_host is not None
    builder = target.inventory.get_host(spec.builder_host)
    if builder in target.state.failed_hosts and not builder.connected:
        raise DeployFailed(
            f"builder {builder.name} is unreachable (see its connection error above); "
            f"bring it up or point {spec.name}'s builder_host at another builder"
        )
    # Targets plan in parallel greenlets: one connects (once), the others wait for it.
    with _builder_locks.setdefault(builder.name, Semaphore()):
        if not builder.connected and builder.name not in _unreachable_builders:
            builder.connect(reason=f"builds for {spec.name}")
            if not builder.connected:
                _unreachable_builders.add(builder.name)
    if not builder.connected:
        raise DeployFailed(
            f"builder {builder.name} is unreachable; bring it up or point "
            f"{spec.name}'s builder_host at another builder"
        )
    return Builder(host=builder, sudo=bool(builder.data.get("_sudo", False)))


def check_builder(builder: Builder, spec: HostSpec) -> None:
    """Fail unless the builder's Nix accepts the target's system and has the push keys."""
    name = builder.host.name
    if not spec.ssh_host_key:
        raise DeployFailed(
            f"{spec.name} has no ssh_host_key, so {name} cannot verify it: set it to the "
            "host's public key and run `pyinfra inventory.py deploys/secrets.py`"
        )
    config = builder.host.get_fact(NixConfig, _sudo=builder.sudo) or {}
    platforms = {config.get("system"), *(config.get("extra-platforms") or [])}
    if spec.nix_system not in platforms:
        raise DeployFailed(
            f"builder {name} cannot build {spec.nix_system} yet (its Nix has no "
            f"extra-platforms for it): add {spec.nix_system} to {name}'s "
            "binfmt_emulated_systems and run `pyinfra inventory.py deploys/nas.py`"
        )
    for path, what in ((DEPLOY_KEY_PATH, "SSH deploy key"), (SIGNING_KEY_PATH, "Nix signing key")):
        if not builder.host.get_fact(File, path=path, _sudo=builder.sudo):
            raise DeployFailed(
                f"builder {name} has no {what} at {path}: install it from sops with "
                "`pyinfra inventory.py deploys/secrets.py`"
            )


def plan_deploy(target: Host, spec: HostSpec, builder: Builder) -> Plan:
    """The target's ``Plan``; logs current -> desired and what changes where Nix can tell."""
    if not spec.flake:
        raise DeployFailed(f"{spec.name} has no flake; set flake in its host or group data")
    attr = toplevel_attr(spec.flake, spec.nixos_config)
    desired = evaluate_toplevel(builder.host, attr, sudo=builder.sudo)
    plan = Plan(
        target=spec.name,
        builder=builder.host.name,
        attr=attr,
        desired=desired,
        current=target.get_fact(StorePathLink, path=CURRENT_SYSTEM),
        profile=target.get_fact(StorePathLink, path=SYSTEM_PROFILE),
        action=spec.deploy_action,
    )
    if plan.action == "build" or not plan.up_to_date:
        # Whether the builder has it matters only when something will be built or copied.
        plan = replace(plan, built=is_built(builder.host, desired, sudo=builder.sudo))
    summary = summary_for(target.state)
    summary.planned(plan)
    if summary.wants_report:
        summary.flake_seen(spec.flake, flake_metadata(builder.host, spec.flake, sudo=builder.sudo))
    if plan.up_to_date:
        target.log_styled(plan.noop_reason, log_func=logger.info)
    else:
        before = plan.profile if plan.action == "boot" else plan.current
        target.log_styled(
            f"{plan.action}: {before or 'no system'} -> {desired}", log_func=logger.info
        )
        if before:
            for line in diff_closures(builder.host, before, desired, sudo=builder.sudo):
                target.log_styled(f"  {line}", log_func=logger.info)
    return plan


@operation(is_idempotent=False)
def unable(reason: str) -> Generator[PyinfraCommand, None, None]:
    """
    Fail the current host with ``reason`` when executed (the others go on).

    + reason: what is wrong and how to fix it; recorded for the run's summary
    """
    yield fail_host(OperationError(reason))


def report_unable(reason: str) -> None:
    """Log a planning failure for the current host now, so ``--dry`` shows it, then fail it."""
    current_host.log_styled(f"cannot deploy: {reason}", fg="red", log_func=logger.error)
    summary_for(current_host.state).fail(current_host.name, reason)
    unable(name="Fail: cannot deploy", reason=reason)


def needed_hosts(specs: Mapping[str, HostSpec], active: set[str]) -> set[str]:
    """Hosts a push deploy needs: the active targets and their builders."""
    targets = {name for name in active if specs[name].is_target}
    builders = {specs[name].builder_host for name in targets}
    return targets | {name for name in builders if name}
