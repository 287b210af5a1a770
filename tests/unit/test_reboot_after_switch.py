"""The reboot after a confirmed switch (operations/push/reboot.py), with the target's side
replaced: each outcome from what the target answers, in order, with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from operations.core.models import Action, Plan
from operations.data.health import HealthCheck
from operations.data.reboot import Reboot, RebootPolicy
from operations.push import reboot
from operations.push.reboot import RebootRun, describe_reboot, reboot_after_switch, reboot_step

OLD, NEW = "/nix/store/old-system", "/nix/store/new-system"
PLAN = Plan("pi4", "nas", "attr", NEW, OLD, NEW, Action.SWITCH)
CHECK = HealthCheck(name="app", kind="command", command="true", timeout=1, retries=0)


class Target:
    """Answers each command by the first matching rule; records what ran."""

    def __init__(
        self,
        booted: str | None,
        *,
        one_shot: bool = True,
        checks_pass: bool = True,
        reboot_answer: tuple[bool, list[str]] | None = None,
        down_polls: int = 1,
    ):
        self.booted, self.one_shot, self.checks_pass = booted, one_shot, checks_pass
        self.reboot_answer, self.down_polls = reboot_answer, down_polls
        self.ran: list[str] = []

    def __call__(
        self, target: Any, command: Any, *, sudo: bool, timeout: float, stdin: str | None = None
    ) -> tuple[bool, list[str]] | None:
        raw = command.get_raw_value()
        if "nixpush-reboot prepare" in raw:
            self.ran.append("prepare")
            line = "one-shot nixos-generation-2.conf nixos-generation-1.conf"
            return True, ["nixpush-reboot " + (line if self.one_shot else "default")]
        if "nixpush-reboot commit" in raw:
            self.ran.append("commit")
            return True, []
        if "nixpush-reboot roll-back" in raw:
            self.ran.append("roll-back")
            return True, ["nixpush-reboot rolled back to " + OLD]
        if "bench-reboot" in raw:
            self.ran.append("reboot")
            return self.reboot_answer
        if "readlink -f /run/booted-system" in raw:
            self.ran.append("poll")
            if self.booted is None or self.down_polls > 0:
                self.down_polls -= 1
                return None
            return True, ["nixpush-reboot booted " + self.booted]
        self.ran.append("check")
        return (True, []) if self.checks_pass else (False, ["app is down"])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_reboot(monkeypatch: pytest.MonkeyPatch, target: Target, timeout: int = 60) -> Any:
    monkeypatch.setattr(reboot, "fresh_login_run", target)
    clock = Clock()
    data = Reboot(RebootPolicy.ALWAYS, timeout, ("/x/bench-reboot",))
    said: list[str] = []
    outcome = reboot_after_switch(
        object(),  # type: ignore[arg-type]
        RebootRun(PLAN, data, (CHECK,), systemd=False, sudo=True),
        said.append, clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    return outcome, said


def test_back_on_the_new_system_and_healthy_is_deployed_and_made_the_default(monkeypatch):
    target = Target(NEW)
    outcome, said = run_reboot(monkeypatch, target)
    assert (outcome.status, outcome.cause) == ("deployed", "")
    assert target.ran == ["prepare", "reboot", "poll", "poll", "check", "commit"]
    assert said[0] == (
        "rebooting: the new system's entry nixos-generation-2.conf boots once, "
        "nixos-generation-1.conf stays the default"
    )
    assert any(s.startswith("after the reboot: health check") and "passed" in s for s in said)


def test_back_on_the_previous_system_rolls_the_profile_back(monkeypatch):
    target = Target(OLD)
    outcome, _ = run_reboot(monkeypatch, target)
    assert (outcome.status, outcome.cause) == ("rolled-back", "booted the previous system")
    assert target.ran[-1] == "roll-back" and "commit" not in target.ran


def test_not_back_in_time_fails_saying_what_boots_next(monkeypatch):
    outcome, _ = run_reboot(monkeypatch, Target(None), timeout=20)
    assert outcome.status == "failed"
    assert outcome.cause == (
        "did not come back after reboot (no SSH login within reboot_timeout=20s); its next "
        f"boot takes the previous system {OLD} (the one-shot entry is used)"
    )
    outcome, _ = run_reboot(monkeypatch, Target(None, one_shot=False), timeout=20)
    assert outcome.cause.endswith(f"; its boot default is {NEW}")


def test_unhealthy_after_the_reboot_fails_and_keeps_the_previous_default(monkeypatch):
    target = Target(NEW, checks_pass=False)
    outcome, _ = run_reboot(monkeypatch, target)
    assert outcome.status == "failed"
    assert outcome.cause == (
        "after the reboot: health check 'app' failed after 1 attempt: app is down; it runs "
        f"{NEW}; its boot default stays {OLD}"
    )
    assert "commit" not in target.ran


def test_a_reboot_command_that_fails_restores_the_default(monkeypatch):
    target = Target(NEW, reboot_answer=(False, ["Failed to reboot: access denied"]))
    outcome, _ = run_reboot(monkeypatch, target)
    assert outcome.status == "failed"
    assert outcome.cause == (
        f"the reboot command failed: Failed to reboot: access denied; it still runs {NEW}"
    )
    assert target.ran == ["prepare", "reboot", "commit"]


def test_reboot_steps_quote_their_values():
    raw = reboot_step("roll-back", "/nix/store/x; whoami").get_raw_value()
    assert "'/nix/store/x; whoami'" in raw and raw.startswith("sh -c ")


def test_dry_says_whether_it_would_reboot():
    assert describe_reboot(Reboot(), ("kernel a → b",)) is None
    when = Reboot(RebootPolicy.WHEN_NEEDED)
    assert describe_reboot(when, ()) == (
        "reboot: when needed: not needed (the boot files do not change)"
    )
    unknown = describe_reboot(when, None) or ""
    assert unknown.startswith("reboot: if the new system's boot files differ")
    always = describe_reboot(Reboot(RebootPolicy.ALWAYS, 90), ()) or ""
    assert always.startswith("reboot: after the confirmed switch, waiting up to 90s")
    assert "(extlinux) a new system that does not boot leaves the host down" in always


def test_a_rebooted_host_says_so_and_needs_no_more_reboot():
    from types import SimpleNamespace

    from operations.core.summary import RunSummary

    pi4 = SimpleNamespace(name="pi4")
    state = SimpleNamespace(
        inventory=[pi4], failed_hosts=set(), current_stage=99, is_host_in_limit=lambda h: True
    )
    summary = RunSummary(state)  # type: ignore[arg-type]
    summary.planned(PLAN)
    summary.reboot_needed("pi4", ("kernel a → b",))
    summary.rebooted("pi4")
    assert summary.outcomes()["pi4"] == ("deployed", f"switch {NEW}; rebooted into it")
    entry = summary.report()["hosts"]["pi4"]
    assert entry["rebooted"] is True and entry["reboot_required"] is False


def _run_reboot_sh(tmp_path: Any, *args: str) -> tuple[str, list[str]]:
    """reboot.sh under sh with a bootctl that records its calls and says ``tmp_path/boot``."""
    import subprocess
    from importlib import resources

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    bootctl = bin_dir / "bootctl"
    bootctl.write_text(
        f'#!/bin/sh\nif [ "$1" = --print-boot-path ]; then echo {tmp_path}/boot; exit 0; fi\n'
        f'echo "$*" >> {calls}\n'
    )
    bootctl.chmod(0o755)
    program = (resources.files("operations.push") / "reboot.sh").read_text()
    result = subprocess.run(
        ["sh", "-c", program, "nixpush-reboot", *args],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )  # fmt: skip
    return result.stdout, calls.read_text().splitlines() if calls.exists() else []


def test_reboot_sh_boots_the_new_entry_once_with_the_previous_the_default(tmp_path):
    entries = tmp_path / "boot" / "loader" / "entries"
    entries.mkdir(parents=True)
    (tmp_path / "boot" / "loader" / "loader.conf").write_text("default nixos-generation-2.conf\n")
    for g, system in ((1, OLD), (2, NEW), (3, NEW + "-other")):
        (entries / f"nixos-generation-{g}.conf").write_text(f"options init={system}/init x\n")
    mark = tmp_path / "run" / "reboot-x"
    out, calls = _run_reboot_sh(tmp_path, "prepare", str(mark), NEW, OLD)
    assert out == "nixpush-reboot one-shot nixos-generation-2.conf nixos-generation-1.conf\n"
    assert calls == ["set-default nixos-generation-1.conf", "set-oneshot nixos-generation-2.conf"]
    assert mark.exists()
    _, calls = _run_reboot_sh(tmp_path, "commit")
    assert calls[2:] == ["set-oneshot ", "set-default "]


def test_reboot_sh_without_systemd_boot_reboots_into_the_default(tmp_path):
    mark = tmp_path / "run" / "reboot-x"
    out, calls = _run_reboot_sh(tmp_path, "prepare", str(mark), NEW, OLD)
    assert out == "nixpush-reboot default\n" and calls == [] and mark.exists()
