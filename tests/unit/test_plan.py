"""Step 1 of the push flow, planning (operations/push/plan.py): which hosts a deploy needs, a
rollback's plan, and a target's plan from its builder's answers (faked at the one process seam,
``run_on``), evaluated once per builder and flake per run."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from types import SimpleNamespace
from typing import Any

import gevent
import pytest
from pyinfra.api.state import StateStage

from operations.core.failures import DeployFailed
from operations.core.models import Action, Builder, Plan
from operations.core.summary import RunSummary
from operations.data.fleet import check_fleet
from operations.push import plan as push_plan
from operations.push.runcache import RunCache
from operations.push.switch import LinksAndPending, SystemGenerations
from tests.unit.fake_host import FakeHost, on_host
from tests.unit.test_fleet import PI_DATA, fleet

A, B, C = (f"/nix/store/{x}-nixos-system" for x in "abc")
FLAKE = "path:/fleet"


# -- which hosts a deploy needs --------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "needed"),
    [
        ("switch", {"nas", "pi"}),
        ("dry-activate", {"nas", "pi"}),
        ("rollback", {"nas", "pi"}),  # the rollback happens on the target
        ("build", {"nas"}),  # only built: the target may be off
    ],
)
def test_a_deploy_needs_every_target_it_contacts_and_their_builders(
    write_inventory, action, needed
):
    specs = check_fleet(write_inventory(fleet(pi={"deploy_action": action})))
    assert specs["pi"].deploy_action is Action(action)
    assert push_plan.needed_hosts(specs, {"nas", "pi"}) == needed


def test_an_unreachable_rollback_target_fails_and_is_not_forgiven(write_inventory):
    inventory = write_inventory(fleet(pi={"deploy_action": "rollback"}))
    specs = check_fleet(inventory)
    pi = inventory.get_host("pi")
    state = SimpleNamespace(
        failed_hosts={pi}, inventory=inventory, current_stage=StateStage.Execute
    )
    summary = RunSummary(state, unreachable={"pi"})  # type: ignore[arg-type]

    summary.forgive(push_plan.needed_hosts(specs, {"nas", "pi"}))

    assert summary.outcomes()["pi"] == ("failed", "could not connect")


def test_only_built_targets_that_are_not_connected_are_built_from_their_builders_run(
    write_inventory,
):
    groups = fleet(pi={"deploy_action": "build"})
    groups["minimal"].append(("pi2", {**PI_DATA, "ssh_hostname": "pi2.test"}))
    inventory = write_inventory(groups)
    specs = check_fleet(inventory)
    nas = inventory.get_host("nas")
    nas.state = SimpleNamespace(is_host_in_limit=lambda host: True)

    assert [spec.name for spec in push_plan.unreachable_builds(nas, specs)] == ["pi"]


def test_a_builder_takes_its_limits_and_sudo_from_its_spec(write_inventory):
    data = {"_sudo": True, "build_timeout": 60, "copy_timeout": 30, "max_parallel_copies": 2}
    inventory = write_inventory(fleet(nas=data))
    nas = inventory.get_host("nas")
    builder = push_plan.builder_of(nas, check_fleet(inventory)["nas"])
    assert builder == Builder(
        host=nas, sudo=True, max_parallel_copies=2, build_timeout=60, copy_timeout=30
    )


# -- a rollback ------------------------------------------------------------------------


def _target_reads(monkeypatch, generations: dict[str, Any]) -> None:
    answers = {SystemGenerations: generations, LinksAndPending: (C, C, None)}
    monkeypatch.setattr(push_plan, "read_on", lambda host, fact, **kw: answers[fact])


def test_a_rollback_goes_to_the_generation_before_the_current_one(write_inventory, monkeypatch):
    spec = check_fleet(write_inventory(fleet(pi={"deploy_action": "rollback"})))["pi"]
    _target_reads(monkeypatch, {"current": 7, "paths": {3: A, 6: B, 7: C, 9: "/nix/store/n"}})
    summary = RunSummary(None)  # type: ignore[arg-type]
    target = FakeHost("pi")

    planned = push_plan.plan_rollback(target, spec, summary)  # type: ignore[arg-type]

    assert planned == Plan(
        target="pi", builder="nas", attr="/nix/var/nix/profiles/system-6-link", desired=B,
        current=C, profile=C, action=Action.ROLLBACK, built=True,
    )  # fmt: skip
    assert not planned.up_to_date and summary.plans["pi"] == planned
    assert target.logged == [f"rollback: {C} -> generation 6, {B}"]


@pytest.mark.parametrize(
    ("generations", "cause"),
    [
        ({"current": 3, "paths": {3: C}}, "pi has no system generation before its current one"),
        ({"current": None, "paths": {}}, "pi has no system generation before none"),
    ],
)
def test_no_older_generation_is_no_rollback(write_inventory, monkeypatch, generations, cause):
    spec = check_fleet(write_inventory(fleet(pi={"deploy_action": "rollback"})))["pi"]
    _target_reads(monkeypatch, generations)
    with pytest.raises(DeployFailed) as failed:
        push_plan.plan_rollback(FakeHost("pi"), spec, RunSummary(None))  # type: ignore[arg-type]
    assert str(failed.value) == cause + " to roll back to"


# -- a target's plan from its builder's answers ----------------------------------------


class FakeBuilder:
    """What the builder answers at the process seam, and what it was asked."""

    def __init__(self, systems: dict[str, str], built: set[str]) -> None:
        self.systems = systems  # configuration -> toplevel
        self.built = built
        self.asked: list[str] = []

    def run_on(self, host: Any, command: Any, **kwargs: Any) -> tuple[bool, list[str]]:
        text = command.get_raw_value()
        self.asked.append(shlex.split(text)[3])  # the nix subcommand (after its features)
        gevent.sleep(0.01)  # others plan meanwhile
        if " flake metadata " in text:  # asked as "flake"
            return True, [json.dumps({"locked": {"narHash": "sha256-x"}, "locks": {}})]
        if " eval " in text:
            answer = {
                name: {"path": path, "drv": path + ".drv"}
                for name, path in self.systems.items()
                if name in text
            }
            return True, [json.dumps(answer)]
        if " path-info " in text:
            return any(path in text for path in self.built), []
        return True, []  # diff-closures: no differences to tell


def _planning(write_inventory, monkeypatch, tmp_path, pis: dict[str, dict[str, Any]]):  # type: ignore[no-untyped-def]
    """Specs of a fleet with ``pis`` (name -> data), a cache, a builder answering for them,
    and the links each target reads (its running system and profile: B, unless told)."""
    monkeypatch.setenv("NIXPUSH_CACHE_DIR", str(tmp_path))
    groups = fleet(pi=None)
    groups["minimal"] = [groups["minimal"][0]] + [
        (name, {"nix_system": "aarch64-linux", "builder_host": "nas", "flake": FLAKE,
                "ssh_hostname": f"{name}.test", "ssh_strict_host_key_checking": "yes", **data})
        for name, data in pis.items()
    ]  # fmt: skip
    inventory = write_inventory(groups)
    specs = check_fleet(inventory)
    builder_answers = FakeBuilder({name: C for name in pis}, built={C})
    monkeypatch.setattr(push_plan, "run_on", builder_answers.run_on)
    links_read: list[str] = []

    def links(target: Any, fact: Any, **kw: Any) -> tuple[tuple[str, str, None], dict[str, Any]]:
        links_read.append(target.name)
        return (B, B, None), {}  # no boot files: not booted from a known system

    monkeypatch.setattr(push_plan, "read_with_host_kind", links)
    return specs, RunCache(specs), builder_answers, links_read


def _plan_all(specs, cache, names):  # type: ignore[no-untyped-def]
    state = SimpleNamespace(
        failed_hosts=set(), inventory=[FakeHost(name) for name in specs],
        is_host_in_limit=lambda host: True,
    )  # fmt: skip
    builder = Builder(host=FakeHost("nas"), sudo=False)  # type: ignore[arg-type]
    summary = RunSummary(None)  # type: ignore[arg-type]
    targets = {}
    for name in names:
        targets[name] = FakeHost(name)
        targets[name].state = state  # type: ignore[attr-defined]

    def plan_one(name: str) -> Plan:
        with on_host(targets[name]):
            return push_plan.plan_deploy(targets[name], specs[name], builder, summary, cache)  # type: ignore[arg-type]

    planners = [gevent.spawn(plan_one, name) for name in names]
    gevent.joinall(planners, raise_error=True)
    return {name: planner.value for name, planner in zip(names, planners, strict=True)}, targets


def test_targets_of_one_builder_are_evaluated_in_one_nix_eval(
    write_inventory, monkeypatch, tmp_path
):
    specs, cache, builder, _ = _planning(
        write_inventory, monkeypatch, tmp_path, {"pi4": {}, "pi5": {}}
    )

    plans, targets = _plan_all(specs, cache, ["pi4", "pi5"])

    # The flake's state before the evaluation, and after it (remembered only if unchanged);
    # one evaluation; whether the builder has C, and B (to tell what changes): once each.
    assert Counter(builder.asked) == {"flake": 2, "eval": 1, "path-info": 2}
    assert {p.desired for p in plans.values()} == {C} and not plans["pi4"].up_to_date
    assert plans["pi4"].built  # the builder has it: nothing to build
    assert [p.target for p in cache.plans_for("nas")] == ["pi4", "pi5"]
    assert targets["pi4"].logged[0] == f"switch: {B} -> {C}"


def test_a_target_on_what_the_flake_evaluated_to_last_run_needs_no_evaluation(
    write_inventory, monkeypatch, tmp_path
):
    specs, cache, builder, _ = _planning(write_inventory, monkeypatch, tmp_path, {"pi4": {}})
    _plan_all(specs, cache, ["pi4"])  # the run before: evaluates, remembers C
    monkeypatch.setattr(
        push_plan, "read_with_host_kind", lambda target, fact, **kw: ((C, C, None), {})
    )
    builder.asked.clear()

    plans, targets = _plan_all(specs, RunCache(specs), ["pi4"])

    assert builder.asked == ["flake"]  # the flake's state, and nothing else
    assert plans["pi4"].up_to_date
    assert targets["pi4"].logged == [f"pi4 already runs {C}"]


def test_a_target_that_is_only_built_is_never_contacted(write_inventory, monkeypatch, tmp_path):
    specs, cache, builder, links_read = _planning(
        write_inventory, monkeypatch, tmp_path, {"pi4": {"deploy_action": "build"}}
    )
    plans, _ = _plan_all(specs, cache, ["pi4"])
    assert links_read == [] and "flake" not in builder.asked
    assert plans["pi4"].action is Action.BUILD and plans["pi4"].up_to_date  # built already
