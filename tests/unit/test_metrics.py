"""nixpush-run's metrics (read back with Prometheus's own parser) and its on_failure alert."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from operations.run import alerts, metrics

OLD = "/nix/store/" + "a" * 32 + "-nixos-system-pi4-1"
NEW = "/nix/store/" + "b" * 32 + "-nixos-system-pi4-2"
FIRST = "2026-01-02T03:00:00+00:00"
SECOND = "2026-01-02T04:00:00+00:00"


def report(
    started: str = FIRST, exit_code: int = 2, mode: str = "check", **hosts: dict[str, Any]
) -> dict[str, Any]:
    hosts = hosts or {
        "nas": {"status": "unchanged", "cause": ""},
        "pi4": {"status": "drifted", "cause": "", "desired": NEW,
                "before": {"current": OLD, "profile": OLD},
                "after": {"current": OLD, "profile": OLD}},
    }  # fmt: skip
    return {
        "id": "x",
        "mode": mode,
        "started": started,
        "duration_s": 12.5,
        "exit_code": exit_code,
        "hosts": hosts,
        "deploys": [
            {"deploy": "deploys/nas.py", "duration_s": 4.0, "error": None, "hosts": {"nas": {}}},
            {
                "deploy": "deploys/pi.py",
                "duration_s": 8.0,
                "error": None,
                "hosts": {"nas": {}, "pi4": {}},
            },
        ],
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_a_drift_check_renders_per_host_status_drift_generation_and_durations():
    last = metrics.LastSuccess().updated(report())
    found = samples(metrics.render(report(), last))

    started = 1767322800.0  # FIRST
    assert value(found, "nixpush_run_exit_code", mode="check") == 2
    assert value(found, "nixpush_run_start_timestamp_seconds", mode="check") == started
    assert value(found, "nixpush_run_duration_seconds", mode="check") == 12.5
    # Drift is a finding, not a failure: the run and both hosts count as successes.
    assert value(found, "nixpush_run_last_success_timestamp_seconds", mode="check") == started
    pi4 = {"mode": "check", "host": "pi4"}
    assert value(found, "nixpush_host_status", status="drifted", **pi4) == 1
    assert value(found, "nixpush_host_status", status="failed", **pi4) == 0
    assert sum(v for (name, labels), v in found.items()
               if name == "nixpush_host_status" and ("host", "pi4") in labels) == 1  # fmt: skip
    assert value(found, "nixpush_host_drift", **pi4) == 1
    assert value(found, "nixpush_host_drift", mode="check", host="nas") == 0
    assert value(found, "nixpush_host_generation_info", path=OLD, **pi4) == 1
    assert value(found, "nixpush_host_last_success_timestamp_seconds", **pi4) == started
    assert value(found, "nixpush_host_duration_seconds", **pi4) == 8.0
    assert value(found, "nixpush_host_duration_seconds", mode="check", host="nas") == 12.0


def test_a_failed_run_keeps_the_last_success_times_of_the_run_before(tmp_path):
    state, out = tmp_path / "state", tmp_path / "metrics"
    state.mkdir()
    metrics.write_metrics(out, state, report(exit_code=0, mode="deploy"))
    failed = report(
        SECOND, exit_code=1, mode="deploy",
        nas={"status": "unchanged", "cause": ""},
        pi4={"status": "failed", "cause": "could not connect", "desired": NEW,
             "before": {"current": OLD, "profile": OLD}, "after": None},
    )  # fmt: skip

    path, _ = metrics.write_metrics(out, state, failed)

    assert path == out / "nixpush_deploy.prom"
    found = samples(path.read_text())
    pi4 = {"mode": "deploy", "host": "pi4"}
    assert value(found, "nixpush_run_exit_code", mode="deploy") == 1
    assert value(found, "nixpush_run_last_success_timestamp_seconds", mode="deploy") == 1767322800
    assert value(found, "nixpush_host_last_success_timestamp_seconds", **pi4) == 1767322800
    assert value(found, "nixpush_host_last_success_timestamp_seconds", mode="deploy",
                 host="nas") == 1767326400  # fmt: skip
    assert value(found, "nixpush_host_status", status="failed", **pi4) == 1
    assert not [
        k for k in found if k[0] == "nixpush_host_generation_info" and ("host", "pi4") in k[1]
    ]
    # What is kept is the state dir's; a new metrics dir still gets the times.
    again, _ = metrics.write_metrics(tmp_path / "elsewhere", state, failed)
    assert samples(again.read_text()) == found


def test_metrics_are_replaced_atomically_world_readable_and_only_prom_files_remain(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "textfiles"
    for mode in ("check", "deploy", "check"):
        metrics.write_metrics(out, state, report(mode=mode))
    assert sorted(p.name for p in out.iterdir()) == ["nixpush_check.prom", "nixpush_deploy.prom"]
    assert stat.S_IMODE(os.stat(out / "nixpush_check.prom").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert sorted(p.name for p in state.iterdir()) == ["metrics-check.json", "metrics-deploy.json"]


def test_an_unreadable_kept_state_starts_afresh():
    assert metrics.load_last_success(Path("/nonexistent/metrics-check.json")) == (
        metrics.LastSuccess()
    )


def test_label_values_are_escaped():
    hostile = 'pi"4\\\nx'
    text = metrics.render(report(**{hostile: {"status": "unchanged", "cause": ""}}),
                          metrics.LastSuccess())  # fmt: skip
    assert value(samples(text), "nixpush_host_drift", mode="check", host=hostile) == 0


# -- on_failure ------------------------------------------------------------------------


def recorder(tmp_path: Path, exit_code: int = 0, extra: str = "") -> list[str]:
    """A command that records its arguments and stdin in tmp_path."""
    script = tmp_path / "alert.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/argv\n'
        f"cat > {tmp_path}/stdin\n"
        f"{extra}\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return [str(script), "--title", "nixpush failed"]


def test_on_failure_gets_the_reports_path_last_and_the_summary_on_stdin(tmp_path):
    command = recorder(tmp_path)
    path = tmp_path / "r.json"

    assert alerts.alert_error(command, report(), path) is None

    assert (tmp_path / "argv").read_text() == f"--title\nnixpush failed\n{path}\n"
    stdin = (tmp_path / "stdin").read_text()
    assert stdin.startswith("nixpush check: drift found (exit 2) in 12.5s, 2 hosts\n")
    assert f"  pi4: drifted: runs {OLD}, wants {NEW}\n" in stdin
    assert stdin.endswith(f"report: {path}\n")


def test_a_failing_on_failure_is_described(tmp_path):
    command = recorder(tmp_path, exit_code=3, extra="echo 'ntfy: 403 forbidden' >&2")
    assert alerts.alert_error(command, report(), tmp_path / "r.json") == (
        f"on_failure {command[0]} exited 3: ntfy: 403 forbidden"
    )
    assert alerts.alert_error(["/nonexistent/curl"], report(), tmp_path / "r.json") == (
        "on_failure /nonexistent/curl could not run: [Errno 2] No such file or directory: "
        "'/nonexistent/curl'"
    )


def test_an_on_failure_that_hangs_is_stopped_with_its_children(tmp_path):
    # A child that keeps the output pipes open would hold a plain subprocess.run forever.
    pid_file = tmp_path / "child"
    command = ["/bin/sh", "-c", f"sleep 300 & echo $! > {pid_file}; sleep 300", "sh"]
    started = time.monotonic()

    problem = alerts.alert_error(command, report(), tmp_path / "r.json", timeout=1)

    assert time.monotonic() - started < 10
    assert problem == "on_failure /bin/sh was stopped after 1s"
    child = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the on_failure command's child still runs")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize(("code", "wanted"), [(0, False), (1, True), (2, True), (64, True)])
def test_which_runs_alert(code, wanted):
    assert alerts.wants_alert(report(exit_code=code)) is wanted
