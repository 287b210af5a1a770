"""
The bench Pi whose PID 1 is a real systemd (``pis``, tests/bench/systemd_host.py): a push
deploy to it, a transient unit started over ssh with sudo (the path a detached switch takes),
and ``deploys/schedule.py`` end to end: units written, ``daemon-reload``, ``enable --now``, and a
timer that fires ``nixpush-run`` and leaves a report.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bench import fleet, systemd_host
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra, ssh
from tests.bench.schedule_inventory import STATE_DIR
from tests.e2e.test_pi import current, deploy, desired_path, new_versions, output, profile
from tests.e2e.test_schedule import UNIT_DIR, UNITS, unchanged

SD = next(h for h in fleet.PIS if h.systemd)
SCHEDULE_INVENTORY = "tests/bench/schedule_inventory.py"
SCHEDULE = "deploys/schedule.py"
CHECK_SERVICE, CHECK_TIMER = "nixpush-check.service", "nixpush-check.timer"
# A runtime drop-in (gone with the host's /run) that makes the installed timer fire now.
FIRE_NOW = Path("/run/systemd/system") / f"{CHECK_TIMER}.d" / "nixpush-test-fire-now.conf"


@pytest.fixture(scope="module")
def ready(push_ready: None) -> None:
    """The session's push preparation (``push_ready``, tests/conftest.py)."""


def sudo(command: list[str], check: bool = True) -> str:
    """Run ``command`` as root on the systemd host over ssh; its stdout, stripped."""
    return ssh(SD.name, shlex.join(["sudo", *command]), check=check).stdout.strip()


def systemctl(*args: str) -> str:
    """``systemctl ARGS`` on the systemd host (a non-zero exit is an answer, not an error)."""
    return sudo(["systemctl", *args], check=False)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.5)


def test_the_systemd_pi_boots_systemd_as_pid_1_in_its_own_namespaces(bench):
    host = on_host(SD.name)
    assert host.check_output("ps -o comm= -p 1") == "systemd"
    assert host.file("/run/systemd/system").is_directory
    state = host.run("systemctl is-system-running --wait").stdout.strip()
    assert state == "running", systemctl("--failed", "--no-pager")
    # container= names a manager systemd does not know: it still knows it is in a container.
    assert host.run("systemd-detect-virt --container").stdout.strip() == "container-other"
    assert host.service(systemd_host.SSHD_UNIT.removesuffix(".service")).is_running
    assert systemctl("is-active", "nix-daemon.socket") == "active"
    # What would act on the whole machine, or is the machine's own, is masked there.
    for unit in ("ssh.service", "postgresql.service", "systemd-binfmt.service",
                 "systemd-sysctl.service", "apt-daily.timer", "getty.target"):  # fmt: skip
        assert systemctl("is-enabled", unit) == "masked", unit
    # Its cgroups are its own, under one cgroup per hierarchy on the machine.
    pid = fleet.init_pid(SD)
    for cgroup in systemd_host.cgroups(SD):
        assert str(pid) in (cgroup / "init.scope" / "cgroup.procs").read_text().split()
    # Its own /var: the machine's is not there (but the bench's directory is).
    assert Path("/var/lib/dpkg/status").exists()
    assert not host.file("/var/lib/dpkg/status").exists
    assert host.file(str(fleet.BENCH_DIR / "known_hosts")).exists
    assert host.check_output("hostname") == SD.name


def test_push_deploy_switches_the_systemd_pi(ready):
    new_versions(SD.name)
    wanted = desired_path(SD.name)

    result = deploy("--limit", SD.name)

    assert result.returncode == 0, output(result)
    assert current(SD.name) == wanted and profile(SD.name) == wanted
    activations = on_host(SD.name).file("/run/bench-activations").content_string
    assert activations.splitlines()[-1] == f"switch {wanted} aarch64"
    assert f"{SD.name}: deployed: switch {wanted}" in output(result)
    # The switch ran in a transient unit, not in the SSH session; its output is in the journal.
    started = [
        line
        for line in output(result).splitlines()
        if "activating detached from this session" in line
    ]
    assert len(started) == 1 and "(systemd unit nixpush-switch-" in started[0], output(result)
    unit = started[0].split("(systemd unit ", 1)[1].split(")", 1)[0]
    journal = sudo(["journalctl", "-u", unit, "--no-pager", "-o", "cat"])
    assert f"nixpush: switch {wanted}" in journal
    assert "nixpush: confirmed" in journal
    # Health checks ran for real there (the roots' unit checks, as this host names them).
    assert f"health check sshd: units {systemd_host.SSHD_UNIT} active: passed" in output(result)


def test_systemd_run_over_ssh_with_sudo_runs_detached_and_logs_to_the_journal(bench):
    unit = f"nixpush-probe-{uuid.uuid4().hex[:8]}"
    script = "echo started by $(id -un); grep name=systemd /proc/self/cgroup; sleep 1; echo done"

    started = sudo(
        ["systemd-run", f"--unit={unit}", "--collect", "--no-ask-password",
         "--service-type=exec", "/bin/sh", "-c", script]
    )  # fmt: skip

    assert started == ""  # "Running as unit: ..." goes to stderr; the ssh session is over
    # --collect: once finished, the unit is gone, also from `systemctl show`.
    wait_for(
        lambda: systemctl("show", "-p", "LoadState", "--value", unit) == "not-found",
        timeout=30,
        what=f"{unit} to finish",
    )
    journal = sudo(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).splitlines()
    assert "started by root" in journal
    # Not in the ssh session's cgroup: the unit's own, under system.slice.
    assert f"name=systemd:/system.slice/{unit}.service" in " ".join(journal)
    assert "done" in journal


@pytest.fixture
def runner(ready: None) -> Iterator[None]:
    """The runner's virtualenv; no nixpush units and no reports on the host before and after."""
    systemd_host.ensure_runner_venv(fleet.BENCH_DIR, fleet.REPO)
    sudo(["rm", "-rf", "--", STATE_DIR, str(FIRE_NOW.parent)])
    yield
    sudo(["rm", "-rf", "--", str(FIRE_NOW.parent)])
    # The plain bench inventory has no schedule: deploys/schedule.py removes the units.
    removed = pyinfra("-y", BENCH_INVENTORY, SCHEDULE, "--limit", SD.name)
    assert removed.returncode == 0, output(removed)


def fire_now() -> None:
    """Make the installed timer elapse one second after it starts again (and only then)."""
    systemctl("stop", CHECK_TIMER)
    drop_in = "[Timer]\nOnCalendar=\nOnActiveSec=1s\nAccuracySec=1ms\nRandomizedDelaySec=0\n"
    sudo(["mkdir", "-p", str(FIRE_NOW.parent)])
    sudo(["sh", "-c", f"printf %s {shlex.quote(drop_in)} > {FIRE_NOW}"])
    systemctl("daemon-reload")
    systemctl("start", CHECK_TIMER)


def test_schedule_enables_timers_and_a_fired_timer_leaves_a_report(runner):
    assert deploy("--limit", SD.name).returncode == 0  # so the check finds no drift

    installed = pyinfra("-y", SCHEDULE_INVENTORY, SCHEDULE, "--limit", SD.name)

    assert installed.returncode == 0, output(installed)
    host = on_host(SD.name)
    assert systemctl("is-enabled", CHECK_TIMER) == "enabled"
    assert systemctl("is-active", CHECK_TIMER) == "active"
    assert CHECK_SERVICE in systemctl("list-timers", "--no-pager", "--no-legend", CHECK_TIMER)
    service = host.file(f"{UNIT_DIR}/{CHECK_SERVICE}").content_string
    program = systemd_host.runner_venv(fleet.BENCH_DIR) / "bin" / "nixpush-run"
    assert f'ExecStart="{program}" "check"' in service and f'"--limit" "{SD.name}"' in service
    assert not host.file(f"{UNIT_DIR}/nixpush-deploy.timer").exists
    again = pyinfra("-y", SCHEDULE_INVENTORY, SCHEDULE, "--limit", SD.name)
    assert again.returncode == 0 and unchanged(again), output(again)

    fire_now()

    latest = f"{STATE_DIR}/reports/latest.json"
    wait_for(
        lambda: host.file(latest).exists and systemctl("is-active", CHECK_SERVICE) != "activating",
        timeout=300,
        what=f"a report from {CHECK_SERVICE}",
    )
    report = json.loads(sudo(["cat", latest]))
    assert report["mode"] == "check" and report["exit_code"] == 0, report
    checkout = systemd_host.runner_checkout(fleet.BENCH_DIR)  # the schedule's: a copy of ours
    assert report["limit"] == [SD.name] and report["checkout"] == str(checkout)
    assert list(report["hosts"]) == [SD.name]
    assert report["hosts"][SD.name]["status"] == "unchanged"
    assert systemctl("show", "-p", "Result", "--value", CHECK_SERVICE) == "success"
    assert systemctl("show", "-p", "LastTriggerUSec", "--value", CHECK_TIMER) not in ("", "n/a")
    journal = sudo(["journalctl", "-u", CHECK_SERVICE, "--no-pager", "-o", "cat"])
    assert "nixpush check: ok (exit 0)" in journal
    assert f"report: {STATE_DIR}/reports/{report['id']}.json" in journal
    # The hardened unit ran it (ProtectSystem=strict, no capabilities, the age key as a
    # credential), its reports readable by the owner's group only.
    assert sudo(["stat", "-c", "%a", STATE_DIR, f"{STATE_DIR}/reports/{report['id']}.json"]) == (
        "750\n640"
    )
    security = sudo(["systemd-analyze", "security", "--no-pager", CHECK_SERVICE])
    exposure = security.split(f"Overall exposure level for {CHECK_SERVICE}: ")[1].split()
    assert float(exposure[0]) <= 2.0, security  # 9.2 UNSAFE before the hardening

    # Without a schedule (the plain bench inventory) the units are disabled and removed.
    removed = pyinfra("-y", BENCH_INVENTORY, SCHEDULE, "--limit", SD.name)
    assert removed.returncode == 0, output(removed)
    assert not any(host.file(f"{UNIT_DIR}/{unit}").exists for unit in UNITS)
    assert "nixpush" not in systemctl("list-timers", "--all", "--no-pager")
