"""
Step 1, plan: for one target, reach its builder, check it can build the target's system,
evaluate the desired toplevel there and read what the target runs now.

Called from deploy code (prepare time, once per host). A problem that concerns only this target
(its builder is unreachable, its configuration is missing from the flake, a lost SSH channel)
raises ``DeployFailed``; the deploy reports it, fails that host, and the others go on.
Evaluation is once per builder and flake per run: the first target to need it evaluates the
toplevels of every selected target of that builder in one ``nix eval`` process (what they share,
nixpkgs, is evaluated once), the others wait for it. Deploy code runs once per host. What a
builder answered once is kept in the run's ``RunCache`` (``deploy.cache``), passed to every step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import gevent
from pyinfra import logger
from pyinfra.context import ctx_config, ctx_host
from pyinfra.facts.files import File

from operations.builder.nix import NixConfig
from operations.builder.nix_commands import (
    diff_closures_command,
    eval_command,
    flake_metadata_command,
    nix_error,
    path_info_command,
    toplevel_attr,
)
from operations.core.boot import BootFiles
from operations.core.failures import DeployFailed
from operations.core.models import CURRENT_SYSTEM, SYSTEM_PROFILE, Action, Builder, Plan
from operations.core.process import read_on, run_on
from operations.core.summary import RunSummary
from operations.data.fleet import HostSpec
from operations.data.steady import read_with_host_kind
from operations.push import evalcache, reboot
from operations.push.commands import Evaluated, batch_eval_command, parse_batch_eval
from operations.push.progress import report_progress, shower
from operations.push.runcache import RunCache
from operations.push.switch import LinksAndPending, SystemGenerations
from operations.trust.keys import DEPLOY_KEY_PATH, SIGNING_KEY_PATH

if TYPE_CHECKING:
    from pyinfra.api.host import Host

READING_LINKS = f"reading {CURRENT_SYSTEM} and {SYSTEM_PROFILE}"


def reach_builder(target: Host, spec: HostSpec, cache: RunCache) -> Builder:
    """The target's builder, connected; ``DeployFailed`` when it cannot be reached."""
    assert spec.builder_host is not None
    builder = target.inventory.get_host(spec.builder_host)
    if builder in target.state.failed_hosts and not builder.connected:
        raise DeployFailed(
            f"builder {builder.name} is unreachable (see its connection error above); "
            f"bring it up or point {spec.name}'s builder_host at another builder"
        )
    # Targets plan in parallel greenlets: one connects (once), the others wait for it.
    with cache.connecting(builder.name):
        if not builder.connected and builder.name not in cache.unreachable_builders:
            builder.connect(reason=f"builds for {spec.name}")
            if not builder.connected:
                cache.unreachable_builders.add(builder.name)
    if not builder.connected:
        raise DeployFailed(
            f"builder {builder.name} is unreachable; bring it up or point "
            f"{spec.name}'s builder_host at another builder"
        )
    return builder_of(builder, cache.specs[builder.name])


def builder_of(host: Host, spec: HostSpec) -> Builder:
    """``host`` as a ``Builder``, with its sudo and limits from its spec."""
    return Builder(
        host=host,
        sudo=spec.sudo,
        max_parallel_copies=spec.max_parallel_copies,
        max_ssh_sessions=spec.max_ssh_sessions,
        build_timeout=spec.build_timeout,
        copy_timeout=spec.copy_timeout,
    )


def check_builder(builder: Builder, spec: HostSpec, cache: RunCache) -> None:
    """Fail unless the builder's Nix accepts the target's system and, when it pushes to the
    target (not to itself), has the push keys."""
    if spec.pushed_by is not None and not spec.ssh_host_key:
        raise DeployFailed(
            f"{spec.name} has no ssh_host_key, so {builder.host.name} cannot verify it: set it "
            "to the host's public key and run `pyinfra inventory.py deploys/secrets.py`"
        )
    check_builds_system(builder, spec, cache)
    if spec.pushed_by is not None:
        _check_push_keys(builder, cache)


def check_builds_system(builder: Builder, spec: HostSpec, cache: RunCache) -> None:
    """Fail unless the builder's Nix accepts ``spec``'s system (natively or emulated)."""
    name = builder.host.name
    if spec.nix_system not in _platforms_of(builder, cache):
        raise DeployFailed(
            f"builder {name} cannot build {spec.nix_system} yet (its Nix has no "
            f"extra-platforms for it): add {spec.nix_system} to {name}'s "
            "binfmt_emulated_systems and run `pyinfra inventory.py deploys/nas.py`"
        )


def _platforms_of(builder: Builder, cache: RunCache) -> frozenset[str | None]:
    """The systems the builder's Nix builds: read once per run, whichever target asks first."""

    def read() -> frozenset[str | None]:
        config = (
            read_on(builder.host, NixConfig, sudo=builder.sudo, doing="reading its Nix settings")
            or {}
        )
        return frozenset({config.get("system"), *(config.get("extra-platforms") or [])})

    return cache.platforms(builder.host.name, read)


def _check_push_keys(builder: Builder, cache: RunCache) -> None:
    """Fail unless the builder has both push keys (looked for once per run)."""

    def missing() -> str | None:
        for path, what in (
            (DEPLOY_KEY_PATH, "SSH deploy key"),
            (SIGNING_KEY_PATH, "Nix signing key"),
        ):
            found = read_on(
                builder.host, File, path=path, sudo=builder.sudo, doing=f"checking {path}"
            )
            if not found:
                return f"no {what} at {path}"
        return None

    problem = cache.push_keys_missing(builder.host.name, missing)
    if problem is not None:
        raise DeployFailed(
            f"builder {builder.host.name} has {problem}: install it from sops with "
            "`pyinfra inventory.py deploys/secrets.py`"
        )


def selected_configs(target: Host, builder: Builder, flake: str, cache: RunCache) -> list[str]:
    """The configurations of every target this run deploys with ``builder`` and ``flake``:
    those in ``--limit``, not already failed (unreachable)."""
    state = target.state
    failed = {h.name for h in state.failed_hosts}
    configs = set()
    for candidate in state.inventory:
        if not state.is_host_in_limit(candidate) or candidate.name in failed:
            continue
        spec = cache.specs[candidate.name]
        if spec.builder_host == builder.host.name and spec.flake == flake:
            configs.add(spec.nixos_config)
    return sorted(configs)


def start_evaluation(
    target: Host,
    builder: Builder,
    flake: str,
    config: str,
    cache: RunCache,
    fingerprint: str | None = None,
) -> None:
    """Start the builder's one evaluation of every selected target's configuration in
    ``flake``, in a greenlet of its own, unless a target already started it: the caller reads
    its target meanwhile, and ``evaluate_toplevel`` waits for the answer. With the flake's
    ``fingerprint`` (read before), the answers are remembered if the flake is still the same
    after the evaluation."""
    key = (builder.host.name, flake)
    if key in cache.evaluations:
        return

    def evaluate_all() -> dict[str, Evaluated | str]:
        configs = selected_configs(target, builder, flake, cache)
        if config not in configs:
            configs.append(config)
        show = shower(builder.host, f"evaluating {len(configs)} configurations")
        try:
            answers = evaluate_configs(builder, flake, configs, show)
        except DeployFailed as failure:  # e.g. a lost channel: every one of them fails with it
            return {name: str(failure) for name in configs}
        # Remembered only if the flake did not change while it was evaluated.
        if fingerprint and _read_flake(builder, flake).get("fingerprint") == fingerprint:
            evalcache.remember(fingerprint, answers)
        return answers

    # pyinfra's host and config contexts are greenlet-local: the new greenlet takes the caller's.
    host_context = ctx_host.get()  # type: ignore[no-untyped-call]
    config_context = ctx_config.get()  # type: ignore[no-untyped-call]

    def evaluate_in_context() -> dict[str, Evaluated | str]:
        with ctx_host.use(host_context), ctx_config.use(config_context):
            return evaluate_all()

    cache.evaluations[key] = gevent.spawn(evaluate_in_context)


def evaluate_toplevel(
    target: Host, builder: Builder, flake: str, config: str, cache: RunCache
) -> Evaluated:
    """
    ``config``'s toplevel as the builder evaluates ``flake``; ``DeployFailed`` with Nix's
    error when it does not evaluate. The first target of a builder evaluates every selected
    target's configuration in one process (``start_evaluation``); the others wait for it and
    take their answer.
    """
    start_evaluation(target, builder, flake, config, cache)
    results = cache.evaluations[(builder.host.name, flake)].get()
    if config not in results:  # a target the first one did not know of: evaluate it alone
        results.update(evaluate_configs(builder, flake, [config], lambda _: None))
    result = results[config]
    if isinstance(result, Evaluated):
        return result
    raise DeployFailed(
        f"{builder.host.name} cannot evaluate {toplevel_attr(flake, config)}: {result}"
    )


def evaluate_configs(
    builder: Builder, flake: str, configs: list[str], show: Callable[[str], None]
) -> dict[str, Evaluated | str]:
    """
    Each of ``configs``' toplevel (or Nix's error for it), in one ``nix eval`` when they all
    evaluate. An error ``builtins.tryEval`` cannot catch fails that process as a whole: then
    the halves are evaluated apart, down to the configuration that fails, so the others go
    on. One that tryEval caught, or that is missing, is evaluated alone for Nix's message.
    """
    doing = f"evaluating {', '.join(configs)} of {flake}"
    ok, lines = report_progress(
        lambda: run_on(
            builder.host,
            batch_eval_command(flake, configs),
            sudo=builder.sudo,
            timeout=builder.build_timeout,
            doing=doing,
        ),
        lambda: None,
        show,
    )
    answers = parse_batch_eval(lines) if ok else None
    if answers is None:
        if len(configs) == 1:
            return {configs[0]: nix_error(lines)}
        half = len(configs) // 2
        return {
            **evaluate_configs(builder, flake, configs[:half], show),
            **evaluate_configs(builder, flake, configs[half:], show),
        }
    results: dict[str, Evaluated | str] = {}
    for config in configs:
        answer = answers.get(config, "no answer")
        results[config] = (
            answer
            if isinstance(answer, Evaluated)
            else _alone(builder, flake, config, missing=answer == "missing")
        )
    return results


def _alone(builder: Builder, flake: str, config: str, *, missing: bool) -> str:
    """Nix's error for one configuration, evaluated alone."""
    attr = toplevel_attr(flake, config)
    ok, lines = run_on(
        builder.host, eval_command(attr), sudo=builder.sudo, timeout=builder.build_timeout,
        doing=f"evaluating {attr}",
    )  # fmt: skip
    if ok:
        return "it evaluates alone but not with the others"
    return _eval_error(lines) if missing else nix_error(lines)


def _eval_error(lines: list[str]) -> str:
    return (
        f"{nix_error(lines)}; check that the flake defines this nixosConfigurations entry "
        "(or set nixos_config)"
    )


def flake_metadata(builder: Builder, flake: str, cache: RunCache) -> dict[str, Any]:
    """
    What the builder resolves ``flake`` to: its git ``revision`` (None for a path or a dirty
    tree), ``narHash`` and ``lastModified``; ``{"error": ...}`` when Nix cannot tell. Cached.
    """
    resolved = _resolved_flake(builder, flake, cache)
    return {name: value for name, value in resolved.items() if name != "fingerprint"}


def flake_fingerprint(builder: Builder, flake: str, cache: RunCache) -> str | None:
    """``evalcache.fingerprint`` of ``flake`` as the builder resolves it now (once per run)."""
    answer = _resolved_flake(builder, flake, cache).get("fingerprint")
    return answer if isinstance(answer, str) else None


def _resolved_flake(builder: Builder, flake: str, cache: RunCache) -> dict[str, Any]:
    """``_read_flake``, once per builder and flake per run."""
    return cache.flakes((builder.host.name, flake), lambda: _read_flake(builder, flake))


def _read_flake(builder: Builder, flake: str) -> dict[str, Any]:
    """``nix flake metadata`` on the builder, read afresh: the report's fields and the
    evaluation cache's ``fingerprint``."""
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
        "fingerprint": evalcache.fingerprint(flake, data),
    }


def is_built(builder: Builder, path: str, cache: RunCache) -> bool:
    """Whether the builder's store has ``path`` (asked once per run: targets share systems)."""

    def look_up() -> bool:
        ok, _ = run_on(
            builder.host, path_info_command(path), sudo=builder.sudo, doing=f"looking up {path}"
        )
        return ok

    return cache.built((builder.host.name, path), look_up)


def diff_closures(builder: Builder, before: str, after: str, cache: RunCache) -> list[str]:
    """What changes between two closures both present on the builder (empty when unknown);
    once per run for each pair."""

    def compare() -> list[str]:
        if not (is_built(builder, before, cache) and is_built(builder, after, cache)):
            return []
        ok, lines = run_on(
            builder.host,
            diff_closures_command(before, after),
            sudo=builder.sudo,
            doing="comparing closures",
        )
        return lines if ok else []

    return cache.diffs((builder.host.name, before, after), compare)


def plan_deploy(
    target: Host, spec: HostSpec, builder: Builder, summary: RunSummary, cache: RunCache
) -> Plan:
    """The target's ``Plan``; logs current -> desired and what changes where Nix can tell."""
    if not spec.flake:
        raise DeployFailed(f"{spec.name} has no flake; set flake in its host or group data")
    attr = toplevel_attr(spec.flake, spec.nixos_config)
    action = spec.deploy_action

    def links() -> tuple[tuple[str | None, str | None, str | None], dict[str, BootFiles]]:
        if not action.contacts_target:  # `build`: the target may be off or away
            return (None, None, None), {}
        # With the target's kind: the activation asks for it (one round trip less); with the
        # activation pending there, if any: it may still roll the links back; with the booted
        # and current systems' boot files (whether a reboot is needed: reboot.py).
        return read_with_host_kind(target, reboot.LinksPendingAndBoot, doing=READING_LINKS)

    # A target already on what this flake state evaluated to last time needs no evaluation;
    # any other evaluates afresh (evalcache). Read the target while the builder evaluates.
    # (Only for a target whose links are read: a remembered answer only finds one up to date.)
    fingerprint = flake_fingerprint(builder, spec.flake, cache) if action.contacts_target else None
    known = evalcache.remembered(fingerprint, spec.nixos_config) if fingerprint else None
    if known is None:
        start_evaluation(target, builder, spec.flake, spec.nixos_config, cache, fingerprint)
    (current, profile, pending), boot = links()
    booted, current_boot = reboot.booted_and_current(boot)

    def plan_for(evaluated: Evaluated) -> Plan:
        return Plan(
            target=spec.name,
            builder=builder.host.name,
            attr=attr,
            desired=evaluated.path,
            current=current,
            profile=profile,
            action=action,
            derivation=evaluated.derivation,
            pending=pending,
            booted=booted,
            new_boot=current_boot if evaluated.path == current else None,
        )

    plan = plan_for(known) if known is not None else None
    if plan is None or not plan.up_to_date:
        start_evaluation(target, builder, spec.flake, spec.nixos_config, cache, fingerprint)
        plan = plan_for(evaluate_toplevel(target, builder, spec.flake, spec.nixos_config, cache))
    desired = plan.desired
    if not plan.action.contacts_target or not plan.up_to_date:
        # Whether the builder has it matters only when something will be built or copied.
        plan = replace(plan, built=is_built(builder, desired, cache))
    if plan.booted is not None and plan.new_boot is None and plan.built:
        plan = replace(plan, new_boot=reboot.read_boot_files(builder.host, desired))
    _record(target, spec.flake, plan, builder, summary, cache)
    return plan


def _record(
    target: Host, flake: str, plan: Plan, builder: Builder, summary: RunSummary,
    cache: RunCache,
) -> None:  # fmt: skip
    """The plan in the run's summary and cache (and the flake's metadata for the report), and
    in the target's log: pending, up to date, or current -> desired with what changes."""
    summary.planned(plan)
    cache.planned(plan)
    if summary.wants_report:
        summary.flake_seen(flake, flake_metadata(builder, flake, cache))
    if plan.pending:
        target.log_styled(
            f"not up to date: {plan.pending} is pending there (this run's activation waits "
            "for it to end)",
            fg="yellow",
            log_func=logger.warning,
        )
    if plan.up_to_date:
        target.log_styled(plan.noop_reason, log_func=logger.info)
    else:
        target.log_styled(
            f"{plan.action}: {plan.before or 'no system'} -> {plan.desired}", log_func=logger.info
        )
        if plan.before:
            for line in diff_closures(builder, plan.before, plan.desired, cache):
                target.log_styled(f"  {line}", log_func=logger.info)
    reboot.log_reboot(target, plan)


def plan_rollback(target: Host, spec: HostSpec, summary: RunSummary) -> Plan:
    """
    The plan for ``deploy_action=rollback``: switch to the generation before the current one.
    Raises ``DeployFailed`` when there is none.
    """
    # The profile's links and /run/current-system are world-readable: no sudo.
    generations = read_on(
        target, SystemGenerations, sudo=False, doing="reading the system's generations"
    )
    number = generations["current"]
    older = sorted(n for n in generations["paths"] if number is not None and n < number)
    if number is None or not older:
        raise DeployFailed(
            f"{spec.name} has no system generation before "
            f"{'its current one' if number is not None else 'none'} to roll back to"
        )
    current, profile, pending = read_on(target, LinksAndPending, sudo=False, doing=READING_LINKS)
    plan = Plan(
        target=spec.name,
        builder=spec.builder_host or "",
        attr=f"{SYSTEM_PROFILE}-{older[-1]}-link",
        desired=generations["paths"][older[-1]],
        current=current,
        profile=profile,
        action=Action.ROLLBACK,
        built=True,
        pending=pending,
    )
    summary.planned(plan)
    target.log_styled(
        f"rollback: {plan.current or 'no system'} -> generation {older[-1]}, {plan.desired}",
        log_func=logger.info,
    )
    return plan


def needed_hosts(specs: Mapping[str, HostSpec], active: set[str]) -> set[str]:
    """Hosts a push deploy needs: the active targets it contacts (``Action.contacts_target``:
    not those only built) and their builders."""
    targets = {name for name in active if specs[name].is_target}
    builders = {specs[name].builder_host for name in targets}
    contacted = {name for name in targets if specs[name].deploy_action.contacts_target}
    return contacted | {name for name in builders if name}


def unreachable_builds(builder: Host, specs: Mapping[str, HostSpec]) -> list[HostSpec]:
    """The targets of ``builder`` in this run that are only built and could not be connected:
    their builds are planned from the builder's own deploy code."""
    state = builder.state
    return [
        spec
        for spec in specs.values()
        if spec.builder_host == builder.name
        and spec.name != builder.name
        and not spec.deploy_action.contacts_target
        and state.is_host_in_limit(target := builder.inventory.get_host(spec.name))
        and not target.connected
    ]
