"""The main job's flow (operations/push/flow.py, what deploys/pi.py runs for each host): which
steps each kind of host gets, in which order, with which arguments. Every step is recorded
instead of run; the steps themselves are tested in test_push.py, test_activation.py, ..."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.facts.files import Directory, File

from operations.builder import nix
from operations.core import failures
from operations.core.failures import DeployFailed
from operations.core.models import NIXOS_MARKER, SYSTEMD_RUNNING, Builder, Safety
from operations.core.summary import RunSummary
from operations.data.fleet import FleetError, check_fleet
from operations.data.reboot import Reboot
from operations.push import activate, build, copy, flow, plan, provenance, prune
from operations.push.runcache import RunCache
from operations.push.start import Deploy
from operations.trust import keys, ssh
from tests.unit.fake_host import FakeHost, FakeState, on_host
from tests.unit.test_activation import NEW, OLD
from tests.unit.test_activation import plan as make_plan
from tests.unit.test_fleet import PI_DATA, fleet

TRUST = keys.BuilderTrust(ssh_public_key="ssh-ed25519 AAAA deploy", nix_public_key="nas-1:KEY=")

# The operations the flow adds, by the name the tests call them.
OPERATIONS = {
    "authorize": (ssh, "authorized_key"),
    "trust": (nix, "trusted_public_key"),
    "build": (build, "build_toplevel"),
    "sign": (copy, "sign_closure"),
    "copy": (copy, "copy_closure"),
    "dry-activate": (activate, "dry_activate"),
    "activate": (activate, "activate_safely"),
    "prune": (prune, "prune_generations"),
    "record": (provenance, "record_deployment"),
}
# What the builder resolved the flake to, for the provenance record.
FLAKE = {"revision": "0123abcd", "narHash": "sha256-x"}


class Run:
    """One run of the flow over a fleet, its steps recorded: ``calls`` holds (step, arguments)
    in call order; ``plans`` what planning answers per target (a ``DeployFailed`` is raised)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, inventory: Any, limit: set[str]) -> None:
        self.inventory = inventory
        self.state = SimpleNamespace(
            inventory=inventory, is_host_in_limit=lambda h: h.name in limit
        )
        specs = check_fleet(inventory)
        self.deploy = Deploy(specs, RunSummary(FakeState()), RunCache(specs))  # type: ignore[arg-type]
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.plans: dict[str, Any] = {}
        self.unconnected: list[str] = []
        for step, (module, name) in OPERATIONS.items():
            monkeypatch.setattr(module, name, self.recorder(step))
        monkeypatch.setattr(prune, "announce", self.recorder("announce pruning", positional=True))
        monkeypatch.setattr(provenance, "flake_metadata", lambda *_: FLAKE)
        monkeypatch.setattr(keys, "builder_trust", self.builder_trust)
        monkeypatch.setattr(plan, "reach_builder", self.reach_builder)
        monkeypatch.setattr(plan, "check_builder", self.recorder("check builder", positional=True))
        monkeypatch.setattr(plan, "plan_deploy", self.plan_deploy)
        monkeypatch.setattr(plan, "plan_rollback", self.plan_rollback)
        monkeypatch.setattr(plan, "unreachable_builds", self.unreachable_builds)
        monkeypatch.setattr(failures, "report_unable", self.recorder("unable", positional=True))

    def recorder(self, step: str, positional: bool = False) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((step, {"args": args} if positional else kwargs))

        return record

    def builder_trust(self, specs: Any, builder: str, for_host: str) -> keys.BuilderTrust:
        self.calls.append(("decrypt trust", {"builder": builder, "for": for_host}))
        return TRUST

    def reach_builder(self, target: Any, spec: Any, cache: RunCache) -> Builder:
        return Builder(self.inventory.get_host(spec.builder_host), sudo=False)

    def planned(self, name: str) -> Any:
        answer = self.plans[name]
        if isinstance(answer, Exception):
            raise answer
        self.calls.append(("plan", {"target": name}))
        return answer

    def plan_deploy(self, target: Any, spec: Any, builder: Builder, *rest: Any) -> Any:
        assert builder.host.name == spec.builder_host
        return self.planned(spec.name)

    def plan_rollback(self, target: Any, spec: Any, summary: RunSummary) -> Any:
        return self.planned(spec.name)

    def unreachable_builds(self, builder: Any, specs: Any) -> list[Any]:
        return [
            specs[name] for name in self.unconnected if specs[name].builder_host == builder.name
        ]

    def go(self, name: str) -> FakeHost:
        """The flow for host ``name``, as deploys/pi.py runs it."""
        # A Debian host without systemd: what the health checks' window is checked against.
        fake = FakeHost(name).fact(File, None, path=NIXOS_MARKER)
        fake.fact(Directory, None, path=SYSTEMD_RUNNING)
        with on_host(fake):
            flow.deploy_target(self.state, fake, self.deploy)  # type: ignore[arg-type]
        return fake

    def steps(self) -> list[str]:
        return [step for step, _ in self.calls]

    def arguments(self, step: str) -> dict[str, Any]:
        (arguments,) = [kwargs for name, kwargs in self.calls if name == step]
        return arguments


def run_of(monkeypatch, write_inventory, groups=None, limit=None, **data) -> Run:
    inventory = write_inventory(groups or fleet(pi=data))
    return Run(monkeypatch, inventory, limit or {h.name for h in inventory})


PUSH = ["decrypt trust", "check builder", "plan", "authorize", "trust", "build", "sign", "copy"]


def test_a_target_that_substitutes_asks_for_it_in_its_copy(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, substitute_on_target=True)
    run.plans["pi"] = make_plan(target="pi")
    run.go("pi")
    assert run.steps() == [*PUSH, "activate", "record"]
    assert run.arguments("copy")["substitute"] is True


def test_a_switch_trusts_builds_copies_and_activates_in_order(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory)
    target_plan = run.plans["pi"] = make_plan(target="pi")
    host = run.go("pi")
    assert run.steps() == [*PUSH, "activate", "record"]
    assert run.arguments("decrypt trust") == {"builder": "nas", "for": "pi"}
    assert run.arguments("authorize") == {
        "name": "Authorize the builder's deploy key", "user": "root", "key": TRUST.ssh_public_key,
    }  # fmt: skip
    assert run.arguments("trust") == {
        "name": "Trust paths signed by the builder", "key": TRUST.nix_public_key,
    }  # fmt: skip
    builder = run.arguments("build")["builder"]
    assert builder.host.name == "nas"
    cache = run.deploy.cache
    assert run.arguments("build") == {
        "name": "Build the system on its builder", "plan": target_plan, "builder": builder,
        "cache": cache,
    }  # fmt: skip
    assert run.arguments("sign") == {
        "name": "Sign the closure on the builder", "plan": target_plan, "builder": builder,
        "cache": cache,
    }  # fmt: skip
    assert run.arguments("copy") == {
        "name": "Copy the closure from the builder", "plan": target_plan, "builder": builder,
        "cache": cache, "address": "pi.test", "port": 22, "user": "root", "substitute": False,
    }  # fmt: skip
    assert run.arguments("activate") == {
        "name": "Activate (detached, confirmed, rolled back on failure)", "plan": target_plan,
        "safety": Safety(confirm_timeout=30, activation_timeout=600), "checks": (),
        "sudo": False, "waves": cache.waves, "soak": 0, "reboot": Reboot(),
    }  # fmt: skip
    assert cache.waves.members == {0: {"pi"}}
    # Once confirmed (the last step), the target records what was deployed, from what.
    record = run.arguments("record")["record"]
    assert record["system"] == target_plan.desired and record["action"] == "switch"
    assert {"nixpush_revision", "controller", "flake", "configuration"} <= set(record)
    assert host.logged == [
        "rollback armed: the target rolls back unless confirmed within 30s over a new SSH login"
        " (activated as test; what it boots changes only once confirmed); activation timeout"
        " 600s",
        "no health checks (health_checks)",
    ]
    assert run.deploy.summary.skipped == {} and run.deploy.summary.causes == {}


def test_the_deploy_user_and_port_reach_the_pushing_steps(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, ssh_user="beau", ssh_port=8023)
    run.plans["pi"] = make_plan(target="pi")
    run.go("pi")
    assert run.arguments("authorize")["user"] == "beau"
    copied = run.arguments("copy")
    assert (copied["address"], copied["port"], copied["user"]) == ("pi.test", 8023, "beau")


def test_an_image_host_is_skipped(monkeypatch, write_inventory):
    groups = fleet()
    groups["images"] = [("@image/iso", {"nix_system": "x86_64-linux", "builder_host": "nas"})]
    run = run_of(monkeypatch, write_inventory, groups)
    run.go("iso")
    assert run.calls == []
    assert run.deploy.summary.skipped == {"iso": "an image: deploys/image.py builds it"}


def test_a_host_without_builder_host_is_no_target(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory)
    run.go("nas")
    assert run.calls == []
    assert run.deploy.summary.skipped == {"nas": "not deployed by push (no builder_host)"}


def test_a_target_on_its_system_gets_no_operation(monkeypatch, write_inventory):
    # Planning logs the noop (plan.py); each operation would be a no-op, and costs CPU per host.
    run = run_of(monkeypatch, write_inventory, keep_generations=3)
    run.plans["pi"] = make_plan(target="pi", current=NEW, profile=NEW)
    host = run.go("pi")
    assert run.steps() == ["decrypt trust", "check builder", "plan"]
    assert host.logged == [] and run.deploy.cache.waves.members == {}


def test_a_target_whose_planning_fails_fails_alone(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory)
    run.plans["pi"] = DeployFailed("nas cannot evaluate pi: error: attribute missing")
    run.go("pi")
    assert run.steps() == ["decrypt trust", "check builder", "unable"]
    assert run.arguments("unable") == {
        "args": ("nas cannot evaluate pi: error: attribute missing",)
    }


def test_a_bug_in_planning_is_named_in_one_line(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory)
    run.plans["pi"] = KeyError("desired")
    run.go("pi")
    assert run.calls[-1] == ("unable", {"args": ("planning pi failed: KeyError: 'desired'",)})


def test_build_only_neither_trusts_nor_activates_but_adds_the_steps_that_say_so(
    monkeypatch, write_inventory
):
    # The steps that do nothing for build are added all the same (each says so: a noop).
    run = run_of(monkeypatch, write_inventory, deploy_action="build")
    run.plans["pi"] = make_plan("build", target="pi")
    host = run.go("pi")
    assert run.steps() == [
        "decrypt trust", "check builder", "plan", "build", "sign", "copy", "dry-activate",
        "activate",
    ]  # fmt: skip
    assert run.arguments("dry-activate") == {
        "name": "Dry-activate", "plan": run.plans["pi"], "sudo": False,
    }  # fmt: skip
    assert run.deploy.cache.waves.members == {} and host.logged == []


def test_dry_activate_copies_and_dry_activates(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, deploy_action="dry-activate")
    run.plans["pi"] = make_plan("dry-activate", target="pi")
    run.go("pi")
    assert run.steps() == [*PUSH, "dry-activate", "activate"]
    assert run.deploy.cache.waves.members == {}


def test_a_host_building_itself_needs_no_trust_and_copies_nothing(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, fleet(nas={"builder_host": "nas",
                                                          "ssh_hostname": "nas.test"}))  # fmt: skip
    run.plans["nas"] = make_plan(target="nas")
    run.go("nas")
    assert run.steps() == ["check builder", "plan", "build", "activate", "record"]
    assert run.arguments("build")["builder"].host.name == "nas"


def test_a_rollback_plans_on_the_target_and_only_activates(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, deploy_action="rollback")
    rollback = run.plans["pi"] = make_plan("rollback", target="pi", desired=OLD, current=NEW)
    run.go("pi")
    # The trust is decrypted first (a wrong age key stops the run) but not applied.
    assert run.steps() == ["decrypt trust", "plan", "activate", "record"]
    assert run.arguments("activate")["plan"] is rollback
    assert run.deploy.cache.waves.members == {0: {"pi"}}


def test_the_record_names_the_flakes_revision_and_the_report_carries_it(
    monkeypatch, write_inventory
):
    run = run_of(monkeypatch, write_inventory, flake="git+file:///home/beau/nixos-config")
    target_plan = run.plans["pi"] = make_plan(target="pi")
    run.go("pi")
    record = run.arguments("record")["record"]
    assert record["system"] == target_plan.desired
    assert record["flake"] == "git+file:///home/beau/nixos-config"
    assert record["flake_revision"] == "0123abcd" and record["flake_nar_hash"] == "sha256-x"
    assert run.deploy.summary.revisions == {"pi": "0123abcd"}


def test_pruning_follows_the_activation(monkeypatch, write_inventory):
    data = {"keep_generations": 3, "gc_after_deploy": True, "ssh_user": "beau", "_sudo": True}
    run = run_of(monkeypatch, write_inventory, **data)
    target_plan = run.plans["pi"] = make_plan(target="pi")
    run.go("pi")
    assert run.steps() == [*PUSH, "activate", "announce pruning", "prune", "record"]
    announced = run.arguments("announce pruning")["args"]
    assert announced[1:] == (target_plan, 3, True, True)
    assert run.arguments("prune") == {
        "name": "Prune old system generations", "plan": target_plan, "keep": 3, "gc": True,
        "sudo": True,
    }  # fmt: skip


def test_gc_alone_keeps_every_generation(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, gc_after_deploy=True)
    run.plans["pi"] = make_plan(target="pi")
    run.go("pi")
    assert run.arguments("prune")["keep"] == prune.KEEP_ALL


def test_a_target_with_nothing_to_activate_holds_no_wave_up(monkeypatch, write_inventory):
    # start_deploy expects every activating target of the run in its wave before any plan.
    run = run_of(monkeypatch, write_inventory, two_waves())
    run.deploy.cache.waves.expect("pi", 1)
    run.deploy.cache.waves.expect("pi2", 0)
    run.plans["pi2"] = make_plan(target="pi2", current=NEW, profile=NEW)
    run.go("pi2")
    assert run.deploy.cache.waves.members == {1: {"pi"}}


def two_waves() -> dict[str, Any]:
    groups = fleet(pi={"deploy_wave": 1, "wave_soak": 60})
    groups["minimal"].append(("pi2", {**PI_DATA, "ssh_hostname": "pi2.test"}))
    return groups


def test_waves_are_announced_and_joined(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, two_waves())
    run.plans["pi"] = make_plan(target="pi")
    run.plans["pi2"] = make_plan(target="pi2")
    later = run.go("pi")
    first = run.go("pi2")
    assert later.logged[-1] == (
        "deploy wave 1 (of 0, 1): activates once wave 0 is deployed and healthy"
    )
    assert first.logged[-1] == (
        "deploy wave 0 (of 0, 1): activates first; then soaks 0s and checks its health again "
        "before the next wave"
    )
    waves = run.deploy.cache.waves
    assert waves.members == {1: {"pi"}, 0: {"pi2"}}
    activations = [kwargs for step, kwargs in run.calls if step == "activate"]
    assert [a["soak"] for a in activations] == [60, 0]
    assert all(a["waves"] is waves for a in activations)
    assert waves.worst["pi"] == activate.worst_case(
        Safety(confirm_timeout=30, activation_timeout=600), (), 60
    )


def test_a_lone_wave_is_not_announced(monkeypatch, write_inventory):
    # pi2 (wave 0) is outside --limit: the run has one wave.
    run = run_of(monkeypatch, write_inventory, two_waves(), limit={"nas", "pi"})
    run.plans["pi"] = make_plan(target="pi")
    host = run.go("pi")
    assert not any(line.startswith("deploy wave") for line in host.logged)


def test_health_checks_that_outlast_the_window_stop_the_run_before_any_operation(
    monkeypatch, write_inventory
):
    check = {"name": "web", "command": "true", "timeout": 20, "retries": 2}
    run = run_of(monkeypatch, write_inventory, health_checks=[check])
    run.plans["pi"] = make_plan(target="pi")
    with pytest.raises(FleetError, match="pi: health_checks take up to"):
        run.go("pi")
    assert run.steps() == ["decrypt trust", "check builder", "plan"]


def test_a_builder_builds_its_unconnected_targets(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, deploy_action="build")
    run.unconnected = ["pi"]
    built = run.plans["pi"] = make_plan("build", target="pi")
    run.go("nas")
    assert run.steps() == ["plan", "build"]
    arguments = run.arguments("build")
    assert arguments["name"] == "Build pi's system (not connected: build only)"
    assert arguments["plan"] is built and arguments["builder"].host.name == "nas"
    assert run.deploy.summary.skipped == {"nas": "not deployed by push (no builder_host)"}


def test_an_unconnected_target_whose_planning_fails_is_recorded(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, deploy_action="build")
    run.unconnected = ["pi"]
    run.plans["pi"] = DeployFailed("pi's configuration does not evaluate")
    run.go("nas")
    assert run.calls == []
    assert run.deploy.summary.causes == {"pi": "pi's configuration does not evaluate"}


def test_unreachable_hosts_the_run_does_not_need_are_forgiven(monkeypatch, write_inventory):
    run = run_of(monkeypatch, write_inventory, limit={"nas"})
    pi = run.inventory.get_host("pi")
    run.deploy.summary.state.failed_hosts.add(pi)
    run.go("nas")
    assert run.deploy.summary.forgiven == {"pi"} and not run.deploy.summary.state.failed_hosts


def test_the_builders_keys_are_decrypted_before_planning(monkeypatch, write_inventory):
    # A missing or wrong age key stops the run (bad input) before anything is evaluated.
    run = run_of(monkeypatch, write_inventory)
    run.plans["pi"] = make_plan(target="pi")

    def no_age_key(specs: Any, builder: str, for_host: str) -> keys.BuilderTrust:
        raise FleetError(["nas: secrets: no age key can decrypt secrets.yaml"])

    monkeypatch.setattr(keys, "builder_trust", no_age_key)
    with pytest.raises(FleetError, match="no age key"):
        run.go("pi")
    assert run.calls == []
