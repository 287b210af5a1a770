"""Activation waves (deploy_wave, wave_soak): the gate in the run's state, how an activation
waits at it and reports to it, the held status in summaries and reports, and the data keys."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gevent
import pytest

from operations.core import failures
from operations.core.models import Safety
from operations.core.summary import RunSummary
from operations.data.fleet import host_spec
from operations.data.health import HealthCheck
from operations.data.reboot import Reboot, RebootPolicy
from operations.push import activate, start, waves
from operations.push.activate import Activation, Outcome
from operations.push.reboot import AfterReboot
from operations.push.runcache import RunCache
from operations.push.waves import Waves
from operations.run import report
from tests.unit.test_activation import OLD, plan
from tests.unit.test_fleet import fleet, only_problem

# -- the gate ---------------------------------------------------------------------------


def gate(**members: int) -> Waves:
    result = Waves()
    for name, wave in members.items():
        result.join(name, wave, worst=600)
    return result


def nothing_dropped() -> list[str]:
    return []


def test_the_first_wave_and_a_lone_wave_go_at_once():
    w = gate(pi4=0, pi5=1)
    assert w.many and w.has_later(0) and not w.has_later(1)
    assert w.wait_turn("pi4", 0, nothing_dropped) is None
    lone = gate(pi4=0, pi5=0)
    assert not lone.many and not lone.has_later(0)


def test_a_later_wave_waits_until_every_host_of_the_earlier_one_passed():
    w = gate(pi4=0, nas=0, pi5=1)
    went: list[str] = []
    waiter = gevent.spawn(lambda: went.append(str(w.wait_turn("pi5", 1, nothing_dropped))))
    gevent.sleep(0.05)
    w.report("pi4", None)
    gevent.sleep(0.05)
    assert went == []  # nas has not reported yet
    w.report("nas", None)
    waiter.join(timeout=5)
    assert went == ["None"]


def test_a_rollback_holds_every_later_wave_with_its_cause():
    w = gate(pi4=0, nas=0, pi5=1, pi6=2)
    w.report("pi4", "pi4 rolled back")
    w.report("nas", None)
    assert w.wait_turn("pi5", 1, nothing_dropped) == "wave 0 failed (pi4 rolled back)"
    w.report("pi5", "pi5 held")
    # Wave 2 names the wave that failed first, not the one held.
    assert w.wait_turn("pi6", 2, nothing_dropped) == "wave 0 failed (pi4 rolled back)"


def test_a_host_dropped_before_its_activation_fails_its_wave():
    w = gate(pi4=0, pi5=1)
    assert w.wait_turn("pi5", 1, lambda: ["pi4", "elsewhere"]) == (
        "wave 0 failed (pi4 failed before its activation)"
    )


def test_waves_may_skip_numbers_and_wait_for_every_earlier_one():
    w = gate(pi4=0, grill=5, nas=9)
    w.report("pi4", None)
    w.report("grill", "grill failed")
    assert w.wait_turn("nas", 9, nothing_dropped) == "wave 5 failed (grill failed)"


def test_a_wave_that_cannot_run_beside_the_later_one_holds_it_after_the_worst_case():
    # --serial (or a small --parallel): pi4's activation cannot run while pi5 waits.
    w = Waves()
    w.join("pi4", 0, worst=30)
    w.join("pi5", 1, worst=999)
    now = [0.0]

    def clock() -> float:
        now[0] += 10
        return now[0]

    held = w.wait_turn("pi5", 1, nothing_dropped, clock=clock)
    assert held is not None
    assert held.startswith("wave 0 did not finish within 30s (still waiting for pi4: ")
    assert "--serial" in held


def test_the_first_report_holds():
    w = gate(pi4=0, pi5=1)
    w.report("pi4", "pi4 failed before its activation")
    w.report("pi4", None)
    assert w.troubles(0) == ["pi4 failed before its activation"]


def test_an_expected_host_that_never_joined_fails_its_wave():
    # pi4 was expected (a target in --limit) but never planned: it could not connect, or its
    # planning failed. At execute time that is a failed wave, not an absent one.
    w = Waves()
    w.expect("pi4", 0)
    w.join("pi5", 1, worst=600)
    assert w.many
    assert w.wait_turn("pi5", 1, nothing_dropped) == (
        "wave 0 failed (pi4 failed before its activation)"
    )


def test_a_canary_that_could_not_connect_names_why():
    w = Waves()
    w.expect("pi4", 0)
    w.report("pi4", "pi4 could not connect")
    w.join("pi5", 1, worst=600)
    assert w.wait_turn("pi5", 1, nothing_dropped) == "wave 0 failed (pi4 could not connect)"


def test_an_excused_host_holds_nothing_and_a_lone_wave_stays_lone():
    w = Waves()
    w.expect("laptop", 0)  # offline_ok and away, or nothing to activate
    w.expect("pi4", 0)
    w.join("pi4", 0, worst=600)
    w.join("pi5", 1, worst=600)
    w.excuse("laptop")
    w.report("pi4", None)
    assert w.wait_turn("pi5", 1, nothing_dropped) is None
    unchanged = Waves()
    unchanged.expect("pi4", 0)
    unchanged.join("pi5", 1, worst=600)
    unchanged.excuse("pi4")
    assert not unchanged.many  # as before: one wave activates, nothing waits or soaks


def test_a_wave_whose_later_hosts_all_failed_to_plan_does_not_soak():
    w = Waves()
    w.join("pi4", 0, worst=600)
    w.expect("pi5", 1)
    assert w.many and not w.has_later(0)


def _targets(**waves_of: int) -> tuple[Any, dict[str, Any], RunSummary]:
    hosts = [SimpleNamespace(name=name) for name in [*waves_of, "nas"]]
    limit = {name for name in waves_of if name != "away"}
    state = SimpleNamespace(
        inventory=hosts, failed_hosts=set(), is_host_in_limit=lambda h: h.name in limit
    )
    specs = {
        name: SimpleNamespace(
            name=name, is_target=True, deploy_action=SimpleNamespace(activates=True),
            deploy_wave=wave,
        )
        for name, wave in waves_of.items()
    }  # fmt: skip
    specs["nas"] = SimpleNamespace(name="nas", is_target=False)
    return state, specs, RunSummary(state)  # type: ignore[arg-type]


def test_start_expects_every_target_in_limit_before_planning():
    state, specs, summary = _targets(pi4=0, laptop=0, pi5=1, pis=1, away=0)
    summary.unreachable = {"pi4", "laptop"}
    summary.offline = {"laptop"}
    w = Waves()
    start.expect_waves(state, specs, summary, w)
    # pi4 is down: its wave failed before anything was planned; the laptop is offline_ok and
    # holds nothing; a host outside --limit is in no wave; nas builds and activates in none.
    assert w.members == {0: {"pi4"}, 1: {"pi5", "pis"}}
    assert w.results == {"pi4": "pi4 could not connect"}
    w.join("pi5", 1, worst=600)
    assert w.wait_turn("pi5", 1, nothing_dropped) == "wave 0 failed (pi4 could not connect)"


def test_the_run_cache_has_one_gate():
    assert isinstance(RunCache({}).waves, Waves)


def test_describe_wave_only_when_the_run_has_several():
    assert waves.describe_wave([0, 0], 0, 60) is None
    assert waves.describe_wave([0, 1, 2], 0, 60) == (
        "deploy wave 0 (of 0, 1, 2): activates first; then soaks 60s and checks its health "
        "again before the next wave"
    )
    assert waves.describe_wave([0, 2], 2, 60) == (
        "deploy wave 2 (of 0, 2): activates once wave 0 is deployed and healthy"
    )


def test_worst_case_covers_the_activation_the_soak_and_the_checks():
    check = HealthCheck(name="sshd", kind="units", units=("sshd.service",), timeout=2, retries=1)
    safety = Safety(confirm_timeout=30, activation_timeout=600)
    bare = activate.worst_case(safety, [], 0)
    assert bare > 4 * 600 + 30
    assert activate.worst_case(safety, [check], 60) == bare + 60 + check.worst_case


# The real one, before ``Fleet`` fakes it.
_REAL_ACTIVATE_NOW = activate._activate_now

# -- activations at the gate --------------------------------------------------------------


class Host:
    def __init__(self, name: str) -> None:
        self.name, self.connected = name, True
        self.logged: list[str] = []
        self.state: Any = None

    def log_styled(self, text: str, **_: Any) -> None:
        self.logged.append(text)

    def connect(self, **_: Any) -> None:
        self.connected = True


class Fleet:
    """Hosts activating through ``activate._activate`` with the real gate, each activation
    faked: ``outcomes[name]`` is what it ends in; ``started`` the order launches happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, members: dict[str, int]) -> None:
        self.hosts = {name: Host(name) for name in members}
        self.state = SimpleNamespace(
            inventory=list(self.hosts.values()), failed_hosts=set(), current_stage=99,
            is_host_in_limit=lambda h: True,
        )  # fmt: skip
        self.summary = RunSummary(self.state)  # type: ignore[arg-type]
        for host in self.hosts.values():
            host.state = self.state
        self.waves = gate(**members)
        self.outcomes: dict[str, str] = {}
        self.started: list[str] = []
        self.soaked: list[str] = []
        self.soak_problem: str | None = None
        monkeypatch.setattr(activate, "summary_for", lambda state: self.summary)
        monkeypatch.setattr(failures, "summary_for", lambda state: self.summary)
        monkeypatch.setattr(activate, "_activate_now", self._activate_now)
        monkeypatch.setattr(activate, "_soak", self._soak)

    def _activate_now(self, state: Any, host: Host, activation: Activation) -> bool:
        self.started.append(host.name)
        gevent.sleep(0.02)
        outcome = self.outcomes.get(host.name, "deployed")
        if outcome == "rolled-back":
            self.summary.rolled_back(host.name, "switch-to-configuration test exited 4")
        elif outcome == "failed":
            self.summary.fail(host.name, "it broke")
        return outcome == "deployed"

    def _soak(self, host: Host, activation: Activation, wave: int) -> str | None:
        self.soaked.append(host.name)
        return self.soak_problem

    def run(self, *dropped: str, reboot: Reboot | None = None) -> dict[str, bool]:
        for name in dropped:
            self.state.failed_hosts.add(self.hosts[name])
        activation = Activation(plan(), Safety(), (), False, True, self.waves, 60, reboot)
        running = {
            name: gevent.spawn(activate._activate, self.state, host, activation)
            for name, host in self.hosts.items()
            if name not in dropped
        }
        gevent.joinall(list(running.values()), timeout=10)
        return {name: g.value for name, g in running.items()}


def test_good_waves_activate_in_order_and_soak_before_the_next(monkeypatch):
    f = Fleet(monkeypatch, {"pi5": 1, "pi4": 0, "nas": 2, "pi6": 1})
    assert f.run() == {"pi5": True, "pi4": True, "nas": True, "pi6": True}
    assert f.started[0] == "pi4"
    assert sorted(f.started[1:3]) == ["pi5", "pi6"]
    assert f.started[3] == "nas"
    assert sorted(f.soaked) == ["pi4", "pi5", "pi6"]  # the last wave soaks for nobody
    assert f.summary.held_back == {}


def test_a_rollback_in_wave_0_holds_the_rest(monkeypatch):
    f = Fleet(monkeypatch, {"pi4": 0, "pi5": 1, "pi6": 1, "nas": 2})
    f.outcomes["pi4"] = "rolled-back"
    assert f.run() == {"pi4": False, "pi5": False, "pi6": False, "nas": False}
    assert f.started == ["pi4"]
    assert f.soaked == []
    held = "wave 0 failed (pi4 rolled back)"
    assert f.summary.held_back == {"pi5": held, "pi6": held, "nas": held}
    outcomes = f.summary.outcomes()
    assert outcomes["pi5"] == ("held", held)
    assert outcomes["pi4"][0] == "rolled-back"
    assert "pi5: held: wave 0 failed (pi4 rolled back)" in f.summary.lines()
    assert f.hosts["pi5"].logged == [f"held: {held}"]


def test_a_failed_health_check_after_the_soak_fails_the_host_and_holds_the_rest(monkeypatch):
    f = Fleet(monkeypatch, {"pi4": 0, "pi5": 1})
    f.soak_problem = "health check sshd failed, 60s after its confirmation"
    assert f.run() == {"pi4": False, "pi5": False}
    assert f.summary.causes["pi4"] == f.soak_problem
    assert f.summary.held_back == {"pi5": "wave 0 failed (pi4 failed)"}


def test_a_host_dropped_before_activation_holds_the_next_wave(monkeypatch):
    f = Fleet(monkeypatch, {"pi4": 0, "pi5": 1, "pi6": 0})
    assert f.run("pi4") == {"pi5": False, "pi6": True}
    assert f.started == ["pi6"]
    assert f.summary.held_back == {"pi5": "wave 0 failed (pi4 failed before its activation)"}


def test_a_run_with_one_wave_never_waits(monkeypatch):
    f = Fleet(monkeypatch, {"pi4": 0, "pi5": 0})
    f.outcomes["pi4"] = "failed"
    assert f.run() == {"pi4": False, "pi5": True}
    assert f.soaked == []


# -- summary, report, exit code -----------------------------------------------------------


def test_report_keeps_held_and_fails_the_run():
    entry = {"status": "held", "cause": "wave 0 failed (pi4 rolled back)", "action": "switch",
             "current": OLD, "profile": OLD, "desired": "/nix/store/new"}  # fmt: skip
    hosts = report.host_outcomes({"hosts": {"pi5": entry}}, None, "", executed=True)
    assert hosts["pi5"].status == "held"
    assert hosts["pi5"].cause == "wave 0 failed (pi4 rolled back)"
    assert hosts["pi5"].paths["after"] == {"current": OLD, "profile": OLD}
    deploy = report.DeployResult("deploys/pi.py", 0, 1.0, hosts)
    merged = report.merge_hosts([deploy])
    assert report.exit_code("deploy", [deploy], merged) == report.ExitCode.FAILED


# -- data ---------------------------------------------------------------------------------


def test_wave_keys_default_and_parse(write_inventory):
    inventory = write_inventory(fleet(pi={"deploy_wave": "2", "wave_soak": 0}))
    spec = host_spec(inventory.get_host("pi"))
    assert (spec.deploy_wave, spec.wave_soak) == (2, 0)
    nas = host_spec(inventory.get_host("nas"))
    assert (nas.deploy_wave, nas.wave_soak) == (0, 0)


@pytest.mark.parametrize(
    ("key", "value", "wanted"),
    [
        ("deploy_wave", -1, "a whole number from 0 to 99"),
        ("deploy_wave", "first", "a whole number from 0 to 99"),
        ("deploy_wave", True, "a whole number from 0 to 99"),
        ("deploy_wave", 100, "a whole number from 0 to 99"),
        ("wave_soak", "1m", "a number of seconds from 0 to 86400"),
    ],
)
def test_bad_wave_keys_are_refused_at_start(write_inventory, key, value, wanted):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem == f"pi: {key} is {value!r}; set it to {wanted}"


@pytest.mark.parametrize("after", ["deployed", "rolled-back"])
def test_a_later_wave_waits_for_the_reboot_and_a_rollback_in_it_holds_the_rest(monkeypatch, after):
    f = Fleet(monkeypatch, {"pi4": 0, "pi5": 1})
    monkeypatch.setattr(activate, "_activate_now", _REAL_ACTIVATE_NOW)
    events: list[str] = []

    def follow(host: Host, activation: Activation) -> Outcome:
        events.append(f"{host.name} switched")
        return Outcome("deployed")

    def reboot(host: Host, run: Any, say: Any) -> AfterReboot:
        gevent.sleep(0.1)
        events.append(f"{host.name} rebooted")
        if host.name == "pi4" and after == "rolled-back":
            return AfterReboot("rolled-back", "booted the previous system")
        return AfterReboot("deployed")

    monkeypatch.setattr(activate, "_follow_activation", follow)
    monkeypatch.setattr(activate, "reboot_after_switch", reboot)
    monkeypatch.setattr(activate, "drop_connection", lambda host: None)
    results = f.run(reboot=Reboot(RebootPolicy.ALWAYS))
    if after == "deployed":
        assert results == {"pi4": True, "pi5": True}
        assert events == ["pi4 switched", "pi4 rebooted", "pi5 switched", "pi5 rebooted"]
        assert f.soaked == ["pi4"]  # after its reboot
        assert f.summary.rebooted_hosts == {"pi4", "pi5"}
    else:
        assert results == {"pi4": False, "pi5": False}
        assert events == ["pi4 switched", "pi4 rebooted"]
        assert f.summary.outcomes()["pi4"] == ("rolled-back", "booted the previous system")
        assert f.summary.held_back == {"pi5": "wave 0 failed (pi4 rolled back)"}
