"""The push run's one state object: answers computed once while the others wait, per run."""

from __future__ import annotations

import gevent
import pytest

from operations.core.models import Action, Builder, Plan
from operations.push import plan as push_plan
from operations.push.runcache import Once, RunCache
from tests.unit.fake_host import FakeHost


def test_the_first_asker_computes_and_the_others_wait_for_its_answer():
    once: Once[str, int] = Once()
    calls: list[str] = []

    def slow(key: str) -> int:
        calls.append(key)
        gevent.sleep(0.05)  # the others arrive while it computes
        return len(calls)

    askers = [gevent.spawn(once, key, lambda key=key: slow(key)) for key in "aaab"]
    gevent.joinall(askers, raise_error=True)

    assert sorted(calls) == ["a", "b"]
    assert [asker.value for asker in askers[:3]] == [askers[0].value] * 3
    assert "a" in once and "c" not in once


def test_a_failed_computation_is_not_remembered():
    once: Once[str, int] = Once()

    def broken() -> int:
        raise RuntimeError("lost the channel")

    with pytest.raises(RuntimeError):
        once("a", broken)
    assert once("a", lambda: 7) == 7


def _plan(target: str, builder: str) -> Plan:
    return Plan(target, builder, "attr", f"/nix/store/{target}", None, None, Action.SWITCH)


def test_plans_are_kept_per_builder():
    cache = RunCache({})
    for target, builder in (("pi4", "nas"), ("pi5", "nas"), ("pc1", "pc1")):
        cache.planned(_plan(target, builder))
    cache.planned(_plan("pi4", "nas"))  # planned again (a second deploy file): replaced

    assert [p.target for p in cache.plans_for("nas")] == ["pi4", "pi5"]
    assert cache.plans_for("elsewhere") == []


def test_targets_sharing_a_system_ask_the_builder_once_per_run(monkeypatch):
    asked: list[str] = []

    def run_on(host, command, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(command.get_raw_value())
        gevent.sleep(0.01)
        return True, []

    monkeypatch.setattr(push_plan, "run_on", run_on)
    builder = Builder(host=FakeHost("nas"), sudo=False)  # type: ignore[arg-type]
    run, next_run = RunCache({}), RunCache({})

    targets = [gevent.spawn(push_plan.is_built, builder, "/nix/store/x", run) for _ in range(4)]
    gevent.joinall(targets, raise_error=True)
    assert all(target.value for target in targets) and len(asked) == 1
    assert push_plan.is_built(builder, "/nix/store/x", next_run)  # a new run asks again
    assert len(asked) == 2
