"""
The confirmation window, the controller's side, without a fleet: health checks that cannot fit
in the confirmation window refused with the numbers, a check that outlasts it reported as that
(no login blamed), a restart in the window reported as one, a pending activation making a plan
not up to date.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest

from operations.core.models import Action, Plan, Safety
from operations.data import health
from operations.data.fleet import FleetError
from operations.data.health import HealthCheck, parse_check
from operations.push import activate
from operations.push.activate import Outcome, judge
from operations.push.switch import ActivationRun

OLD, NEW = "/nix/store/aaa-nixos-system-pi4-1", "/nix/store/bbb-nixos-system-pi4-2"


def plan(action: str = "switch", **kw: Any) -> Plan:
    fields: dict[str, Any] = {
        "target": "pi4", "builder": "nas", "attr": "f#x", "desired": NEW,
        "current": OLD, "profile": OLD, "action": Action(action),
    }  # fmt: skip
    return Plan(**{**fields, **kw})


# -- 6. health checks within the window --------------------------------------------------


def test_a_checks_worst_case_is_every_attempt_timing_out_with_the_pauses():
    check = HealthCheck(name="web", kind="url", url="http://x/", timeout=12, retries=2)
    assert check.worst_case == 3 * 12 + 2 * health.RETRY_INTERVAL


def fake_host(**data: Any) -> Any:
    return SimpleNamespace(name="pi4", data=data)


def test_checks_that_may_outlast_the_window_are_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(activate, "runs_systemd", lambda: False)
    checks = [
        HealthCheck(name="web", kind="url", url="http://x/", timeout=12, retries=2),
        HealthCheck(name="sshd", kind="units", units=("sshd.service",)),  # skipped: no systemd
    ]
    with pytest.raises(FleetError) as error:
        activate.check_window(fake_host(), Safety(True, 30, 600), checks)
    assert error.value.problems == (
        "pi4: health_checks take up to 40s (web 40s; each (retries + 1) x timeout + retries x "
        "2s), longer than confirm_timeout (30s): set confirm_timeout to 40 or more, or lower "
        "the checks' timeout or retries",
    )
    activate.check_window(fake_host(), Safety(True, 40, 600), checks)  # fits
    # Nothing is confirmed without a rollback armed (boot, rollback: False): no window.
    activate.check_window(fake_host(), Safety(False, 30, 600), checks)
    # With systemd, the unit check counts too.
    monkeypatch.setattr(activate, "runs_systemd", lambda: True)
    with pytest.raises(FleetError, match=r"take up to 74s \(web 40s, sshd 34s"):
        activate.check_window(fake_host(), Safety(True, 40, 600), checks)


def test_the_owners_roots_checks_fit_their_confirmation_window():
    # What a machine in every root with checks gets (group_data), on systemd: all of it.
    timeouts: dict[str, int] = {}
    checks: dict[str, HealthCheck] = {}
    for root in ("minimal", "common", "network", "main", "work", "gaming", "server"):
        module = importlib.import_module(f"group_data.{root}")
        for entry in getattr(module, "health_checks", []):
            check, problems = parse_check(entry)
            assert check is not None, problems
            checks[check.name] = check
        if hasattr(module, "confirm_timeout"):
            timeouts[root] = module.confirm_timeout
    assert timeouts == {"main": 60}  # one root sets it: no two roots disagree
    every = Safety(confirm_timeout=60)
    assert activate.window_problem(every, list(checks.values()), systemd=True) is None
    not_main = [c for c in checks.values() if c.name != "syncthing"]
    assert activate.window_problem(Safety(), not_main, systemd=True) is None


class Clock:
    """A monotonic clock that moves only when a check runs (each attempt takes ``step``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def confirm_with(monkeypatch, checks, answers, step):
    """``_check_and_confirm`` against a channel whose attempts each take ``step`` s."""
    clock = Clock()
    monkeypatch.setattr(activate, "time", clock)
    monkeypatch.setattr(health, "RETRY_INTERVAL", 0)
    logins: list[Any] = []
    monkeypatch.setattr(activate, "fresh_login_run", lambda *a, **k: logins.append(a))
    sent: list[str] = []
    replies = iter(answers)

    class Channel:
        host, sudo = SimpleNamespace(name="pi4"), True

        def run(self, command, timeout, stdin=None):
            sent.append(command.get_raw_value())
            if "nixpush-reject" in sent[-1]:
                return True, []
            clock.now += step
            return next(replies)

    run = ActivationRun(
        id="x", action="switch", desired=NEW, generation=None,
        safety=Safety(confirm_timeout=30), systemd=False,
    )  # fmt: skip
    said: list[str] = []
    problem, answer = activate._check_and_confirm(
        Channel(), run, checks, False, lambda text, **_: said.append(text), 0
    )  # type: ignore[arg-type]
    return problem, answer, logins, sent, said


def test_a_check_passing_after_the_window_closed_is_reported_as_outlasting_it(monkeypatch):
    # The case: a URL check passing on its third 12 s attempt, confirm_timeout 30.
    web = HealthCheck(name="web", kind="url", url="http://x/", timeout=12, retries=2)
    problem, answer, logins, sent, _ = confirm_with(
        monkeypatch, [web], [(False, ["refused"]), (False, ["refused"]), (True, [])], 12
    )
    assert problem == "the health checks took 36s, outlasting the 30s confirmation window"
    assert answer is None and logins == []  # no login attempted, none blamed
    assert "nixpush-reject" in sent[-1]  # the target is told at once


def test_a_check_still_failing_when_the_window_closes_stops_there(monkeypatch):
    web = HealthCheck(name="web", kind="url", url="http://x/", timeout=12, retries=5)
    problem, _, logins, sent, _ = confirm_with(monkeypatch, [web], [(False, ["refused"])] * 6, 12)
    assert problem == (
        "health check 'web' outlasted the confirmation window (3 attempts made, last: refused)"
    )
    assert logins == [] and len([s for s in sent if "nixpush-health" in s]) == 3


# -- 3. a restart in the window ----------------------------------------------------------


def test_a_run_gone_after_it_was_seen_is_a_restart_before_confirmation():
    gone = {"state": "missing", "current": OLD, "profile": OLD}
    assert judge(plan(), gone, "the confirmation came too late", seen=True) == Outcome(
        "rolled-back", f"restarted before confirmation: still on {OLD}"
    )
    # After a real reboot the running link is the boot default; on a bench, maybe nothing.
    assert judge(plan(), {**gone, "current": ""}, seen=True).status == "rolled-back"
    # Never seen: it did not start.
    assert judge(plan(), gone) == Outcome("failed", "the activation did not start on the target")
    # Its profile moved (committed just before the restart): not "still on" the old one.
    moved = judge(plan(), {**gone, "profile": NEW}, seen=True)
    assert moved.status == "failed" and f"it boots {NEW}" in moved.cause


def test_a_rollback_is_judged_against_what_ran_when_the_program_started():
    # Another run changed the host between this plan and this run's launch (it waited for
    # the lock): back on what the program found is a rollback, not a failure.
    other = "/nix/store/ccc-nixos-system-pi4-3"
    status = {
        "state": "rolled-back", "cause": "no confirmation within 30s", "current": other,
        "profile": other, "previous": other, "previous-profile": other,
    }  # fmt: skip
    assert judge(plan(), status) == Outcome("rolled-back", "no confirmation within 30s")


# -- 1. a pending activation -------------------------------------------------------------


def test_a_pending_activation_makes_a_plan_not_up_to_date():
    done = plan(current=NEW, profile=NEW)
    assert done.up_to_date
    pending = plan(current=NEW, profile=NEW, pending="activation x, started t by me")
    assert not pending.up_to_date
    assert plan("build", built=True, pending="activation x").up_to_date  # builds only
