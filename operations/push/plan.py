"""
Step 1, plan: for one target, reach its builder, check it can build the target's system,
evaluate the desired toplevel there and read what the target runs now.

Called from deploy code (prepare time, once per host). A problem that concerns only this target
(its builder is unreachable, its configuration is missing from the flake, a lost SSH channel)
raises ``DeployFailed``; the deploy reports it, fails that host, and the others go on.
Evaluations are cached per run: deploy code runs once per host, and many targets may share one
configuration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from gevent.lock import Semaphore
from pyinfra import logger
from pyinfra.facts.files import File

from operations.failures import DeployFailed
from operations.fleet import HostSpec
from operations.keys import DEPLOY_KEY_PATH, SIGNING_KEY_PATH
from operations.models import CURRENT_SYSTEM, SYSTEM_PROFILE, Action, Builder, Plan
from operations.nix import NixConfig
from operations.process import read_on, run_on
from operations.push.commands import (
    StorePathLink,
    diff_closures_command,
    eval_command,
    flake_metadata_command,
    nix_error,
    path_info_command,
    toplevel_attr,
)
from operations.push.switch import SystemGenerations
from operations.summary import RunSummary

if TYPE_CHECKING:
    from pyinfra.api.host import Host

T = TypeVar("T")

_builder_locks: dict[str, Semaphore] = {}
_unreachable_builders: set[str] = set()
_evaluated: dict[tuple[str, str], str] = {}
_flake_metadata: dict[tuple[str, str], dict[str, Any]] = {}
_locks: dict[tuple[str, str], Semaphore] = {}


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
    """Fail unless the builder's Nix accepts the target's system and, when it pushes to the
    target (not to itself), has the push keys."""
    if spec.pushed_by is not None and not spec.ssh_host_key:
        raise DeployFailed(
            f"{spec.name} has no ssh_host_key, so {builder.host.name} cannot verify it: set it "
            "to the host's public key and run `pyinfra inventory.py deploys/secrets.py`"
        )
    check_builds_system(builder, spec)
    if spec.pushed_by is not None:
        _check_push_keys(builder)


def check_builds_system(builder: Builder, spec: HostSpec) -> None:
    """Fail unless the builder's Nix accepts ``spec``'s system (natively or emulated)."""
    name = builder.host.name
    config = (
        read_on(builder.host, NixConfig, sudo=builder.sudo, doing="reading its Nix settings") or {}
    )
    platforms = {config.get("system"), *(config.get("extra-platforms") or [])}
    if spec.nix_system not in platforms:
        raise DeployFailed(
            f"builder {name} cannot build {spec.nix_system} yet (its Nix has no "
            f"extra-platforms for it): add {spec.nix_system} to {name}'s "
            "binfmt_emulated_systems and run `pyinfra inventory.py deploys/nas.py`"
        )


def _check_push_keys(builder: Builder) -> None:
    name = builder.host.name
    for path, what in ((DEPLOY_KEY_PATH, "SSH deploy key"), (SIGNING_KEY_PATH, "Nix signing key")):
        if not read_on(builder.host, File, path=path, sudo=builder.sudo, doing=f"checking {path}"):
            raise DeployFailed(
                f"builder {name} has no {what} at {path}: install it from sops with "
                "`pyinfra inventory.py deploys/secrets.py`"
            )


def _once(cache: dict[tuple[str, str], T], key: tuple[str, str], compute: Callable[[], T]) -> T:
    """``cache[key]``, computed by the first target that asks; the others wait for it."""
    with _locks.setdefault(key, Semaphore()):
        if key not in cache:
            cache[key] = compute()
    return cache[key]


def evaluate_toplevel(builder: Builder, attr: str) -> str:
    """The toplevel's store path as the builder evaluates ``attr``; raises ``DeployFailed``."""

    def evaluate() -> str:
        ok, lines = run_on(
            builder.host, eval_command(attr), sudo=builder.sudo, timeout=600,
            doing=f"evaluating {attr}",
        )  # fmt: skip
        path = lines[-1].strip() if lines else ""
        if not ok or not path.startswith("/nix/store/"):
            raise DeployFailed(
                f"{builder.host.name} cannot evaluate {attr}: {nix_error(lines)}; check that "
                "the flake defines this nixosConfigurations entry (or set nixos_config)"
            )
        return path

    return _once(_evaluated, (builder.host.name, attr), evaluate)


def flake_metadata(builder: Builder, flake: str) -> dict[str, Any]:
    """
    What the builder resolves ``flake`` to: its git ``revision`` (None for a path or a dirty
    tree), ``narHash`` and ``lastModified``; ``{"error": ...}`` when Nix cannot tell. Cached.
    """

    def resolve() -> dict[str, Any]:
        ok, lines = run_on(
            builder.host, flake_metadata_command(flake), sudo=builder.sudo, timeout=120,
            doing=f"resolving {flake}",
        )  # fmt: skip
        try:
            data = json.loads(lines[-1]) if ok and lines else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            return {"error": nix_error(lines)}
        locked = data.get("locked") or {}
        return {
            "revision": data.get("revision") or locked.get("rev"),
            "narHash": locked.get("narHash"),
            "lastModified": data.get("lastModified"),
        }

    return _once(_flake_metadata, (builder.host.name, flake), resolve)


def is_built(builder: Builder, path: str) -> bool:
    """Whether the builder's store has ``path``."""
    ok, _ = run_on(
        builder.host, path_info_command(path), sudo=builder.sudo, doing=f"looking up {path}"
    )
    return ok


def diff_closures(builder: Builder, before: str, after: str) -> list[str]:
    """What changes between two closures both present on the builder (empty when unknown)."""
    if not (is_built(builder, before) and is_built(builder, after)):
        return []
    ok, lines = run_on(
        builder.host,
        diff_closures_command(before, after),
        sudo=builder.sudo,
        doing="comparing closures",
    )
    return lines if ok else []


def plan_deploy(target: Host, spec: HostSpec, builder: Builder, summary: RunSummary) -> Plan:
    """The target's ``Plan``; logs current -> desired and what changes where Nix can tell."""
    if not spec.flake:
        raise DeployFailed(f"{spec.name} has no flake; set flake in its host or group data")
    attr = toplevel_attr(spec.flake, spec.nixos_config)
    desired = evaluate_toplevel(builder, attr)
    sudo = bool(target.data.get("_sudo", False))

    def link(path: str) -> str | None:
        return read_on(target, StorePathLink, path=path, sudo=sudo, doing=f"reading {path}")

    plan = Plan(
        target=spec.name,
        builder=builder.host.name,
        attr=attr,
        desired=desired,
        current=link(CURRENT_SYSTEM),
        profile=link(SYSTEM_PROFILE),
        action=Action(spec.deploy_action),
    )
    if plan.action is Action.BUILD or not plan.up_to_date:
        # Whether the builder has it matters only when something will be built or copied.
        plan = replace(plan, built=is_built(builder, desired))
    summary.planned(plan)
    if summary.wants_report:
        summary.flake_seen(spec.flake, flake_metadata(builder, spec.flake))
    if plan.up_to_date:
        target.log_styled(plan.noop_reason, log_func=logger.info)
    else:
        target.log_styled(
            f"{plan.action}: {plan.before or 'no system'} -> {desired}", log_func=logger.info
        )
        if plan.before:
            for line in diff_closures(builder, plan.before, desired):
                target.log_styled(f"  {line}", log_func=logger.info)
    return plan


def plan_rollback(target: Host, spec: HostSpec, summary: RunSummary) -> Plan:
    """
    The plan for ``deploy_action=rollback``: switch to the generation before the current one.
    Raises ``DeployFailed`` when there is none.
    """
    sudo = bool(target.data.get("_sudo", False))
    generations = read_on(
        target, SystemGenerations, sudo=sudo, doing="reading the system's generations"
    )
    current = generations["current"]
    older = sorted(n for n in generations["paths"] if current is not None and n < current)
    if current is None or not older:
        raise DeployFailed(
            f"{spec.name} has no system generation before "
            f"{'its current one' if current is not None else 'none'} to roll back to"
        )
    plan = Plan(
        target=spec.name,
        builder=spec.builder_host or "",
        attr=f"{SYSTEM_PROFILE}-{older[-1]}-link",
        desired=generations["paths"][older[-1]],
        current=read_on(
            target, StorePathLink, path=CURRENT_SYSTEM, sudo=sudo, doing=f"reading {CURRENT_SYSTEM}"
        ),
        profile=read_on(
            target, StorePathLink, path=SYSTEM_PROFILE, sudo=sudo, doing=f"reading {SYSTEM_PROFILE}"
        ),
        action=Action.ROLLBACK,
        built=True,
    )
    summary.planned(plan)
    target.log_styled(
        f"rollback: {plan.current or 'no system'} -> generation {older[-1]}, {plan.desired}",
        log_func=logger.info,
    )
    return plan


def needed_hosts(specs: Mapping[str, HostSpec], active: set[str]) -> set[str]:
    """Hosts a push deploy needs: the active targets and their builders."""
    targets = {name for name in active if specs[name].is_target}
    builders = {specs[name].builder_host for name in targets}
    return targets | {name for name in builders if name}
