"""nixpush-run without a fleet: reading results, merging, exit codes, reports, the lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyinfra_cli.util
import pytest

from operations.run import report, runner
from operations.run.report import DeployResult, ExitCode, HostOutcome

OLD, NEW = "/nix/store/aaa-nixos-system-pi4-1", "/nix/store/bbb-nixos-system-pi4-2"


def summary(**hosts: dict[str, Any]) -> dict[str, Any]:
    return {"executed": False, "hosts": hosts, "flakes": {}}


def target(status: str, cause: str = "", action: str = "switch") -> dict[str, Any]:
    return {
        "status": status, "cause": cause, "action": action,
        "current": OLD, "profile": OLD, "desired": NEW,
    }  # fmt: skip


def plan_json(*ops: tuple[str, list[str]]) -> dict[str, Any]:
    return {
        "plan": [
            {"name": name, "hosts_with_change": hosts, "hosts_with_conditional_change": []}
            for name, hosts in ops
        ],
        "results": None,
    }


# -- reading one deploy ----------------------------------------------------------------


def test_check_of_a_pi_that_differs_is_drift_with_both_paths():
    hosts = report.host_outcomes(
        summary(pi4=target("planned", "would switch"), pi5=target("unchanged")),
        plan_json(("Activate", ["pi4"])), "", executed=False,
    )  # fmt: skip
    assert hosts["pi4"].status == "drifted"
    assert hosts["pi4"].paths["before"] == {"current": OLD, "profile": OLD}
    assert hosts["pi4"].paths["desired"] == NEW
    assert hosts["pi4"].paths["after"] == {
        "current": OLD,
        "profile": OLD,
    }  # a check changes nothing
    assert hosts["pi5"].status == "unchanged"


def test_deploy_records_paths_before_and_after():
    hosts = report.host_outcomes(
        {"hosts": {"pi4": target("deployed"), "pi5": target("deployed", action="boot")}},
        None, "", executed=True,
    )  # fmt: skip
    assert hosts["pi4"].status == "changed"
    assert hosts["pi4"].paths["after"] == {"current": NEW, "profile": NEW}
    assert hosts["pi5"].paths["after"] == {"current": OLD, "profile": NEW}  # boot: next boot only


@pytest.mark.parametrize(
    ("action", "after"),
    [
        ("rollback", {"current": NEW, "profile": NEW}),  # NEW: the older generation it runs
        ("test", {"current": NEW, "profile": OLD}),
        ("dry-activate", {"current": OLD, "profile": OLD}),
        ("build", {"current": OLD, "profile": OLD}),
    ],
)
def test_after_paths_follow_what_the_action_does(action, after):
    hosts = report.host_outcomes(
        {"hosts": {"pi4": target("deployed", action=action)}}, None, "", executed=True
    )
    assert hosts["pi4"].paths["after"] == after


def test_failed_host_has_no_known_after_and_gets_pyinfras_connect_error():
    log = "    [pi5] \x1b[31mCould not connect (timed out)\x1b[0m\n"
    hosts = report.host_outcomes(
        summary(pi5=target("failed", "could not connect")), None, log, executed=True
    )
    assert hosts["pi5"] == HostOutcome(
        "failed",
        "could not connect: Could not connect (timed out)",
        {
            "action": "switch",
            "desired": NEW,
            "before": {"current": OLD, "profile": OLD},
            "after": None,
        },
    )


def test_other_deploys_changes_come_from_pyinfras_plan():
    hosts = report.host_outcomes(
        summary(nas={"status": "unchanged", "cause": ""}, pi4={"status": "unchanged", "cause": ""}),
        plan_json(("Let Nix build for the emulated systems", ["nas"]), ("Other", [])),
        "", executed=False,
    )  # fmt: skip
    assert hosts["nas"] == HostOutcome("drifted", "Let Nix build for the emulated systems")
    assert hosts["pi4"] == HostOutcome("unchanged", "")


def test_pyinfra_results_without_a_summary():
    results = {
        "plan": [],
        "results": {
            "operations": [{"name": "Write", "success": ["nas"], "error": ["pi4"]}],
            "failed_hosts": ["pi4"],
        },
    }
    hosts = report.host_outcomes(None, results, "", executed=True)
    assert hosts == {
        "nas": HostOutcome("changed", "Write"),
        "pi4": HostOutcome("failed", "an operation failed"),
    }


def test_parse_pyinfra_json_takes_the_document_line():
    assert report.parse_pyinfra_json('noise\n{"plan": [], "results": null}\n') == {
        "plan": [],
        "results": None,
    }
    assert report.parse_pyinfra_json("") is None
    assert report.parse_pyinfra_json("{not json") is None


# -- the run ---------------------------------------------------------------------------


def deploy(name: str, returncode: int = 0, **hosts: HostOutcome) -> DeployResult:
    return DeployResult(deploy=name, returncode=returncode, duration_s=1.0, hosts=hosts)


def test_merge_takes_the_worst_status_and_keeps_the_paths():
    merged = report.merge_hosts(
        [
            deploy("deploys/nas.py", nas=HostOutcome("unchanged")),
            deploy(
                "deploys/pi.py",
                nas=HostOutcome("skipped", "not deployed by push"),
                pi4=HostOutcome("drifted", "would switch", {"desired": NEW}),
            ),
            deploy("deploys/secrets.py", pi4=HostOutcome("failed", "sops: no key")),
        ]
    )
    assert merged["nas"] == {"status": "unchanged", "cause": ""}
    assert merged["pi4"] == {
        "status": "failed",
        "cause": "deploys/secrets.py: sops: no key",
        "desired": NEW,
    }


@pytest.mark.parametrize(
    ("mode", "statuses", "returncode", "expected"),
    [
        ("check", ["unchanged", "skipped"], 0, ExitCode.OK),
        ("check", ["drifted", "unchanged"], 0, ExitCode.DRIFT),
        ("check", ["drifted", "failed"], 1, ExitCode.FAILED),
        ("deploy", ["changed", "unchanged"], 0, ExitCode.OK),
        ("deploy", ["changed", "failed"], 1, ExitCode.FAILED),
        ("check", ["unchanged"], 1, ExitCode.FAILED),  # a deploy errored, no host to blame
        ("deploy", ["drifted"], 0, ExitCode.OK),  # drift only counts in check mode
    ],
)
def test_exit_codes(mode, statuses, returncode, expected):
    hosts = {f"h{i}": {"status": s} for i, s in enumerate(statuses)}
    assert report.exit_code(mode, [deploy("d", returncode)], hosts) == expected


def test_limit_matching_nothing_is_a_usage_error():
    unmatched = DeployResult("deploys/pi.py", 0, 0.5, {}, "no host", no_host_matched=True)
    assert report.exit_code("deploy", [unmatched], {}) == ExitCode.USAGE


def test_exit_code_values_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 64, 75]
    for code in ExitCode:
        assert f"\n  {int(code):<4}" in runner.EPILOG


def test_flake_revision_is_unknown_with_a_reason_when_nothing_was_planned():
    assert report.flake_revision([None, {"flakes": {}}]).startswith("unknown: ")
    meta = {"revision": "abc", "narHash": "sha256-x", "lastModified": 1}
    assert report.flake_revision([None, {"flakes": {"path:/f": meta}}]) == {"path:/f": meta}


def test_human_summary_names_drift_with_paths_and_errors():
    lines = report.human_summary(
        {
            "mode": "check", "exit_code": 2, "duration_s": 12.34,
            "hosts": {
                "pi4": {"status": "drifted", "cause": "x", "desired": NEW,
                        "before": {"current": OLD}, "after": {"current": OLD}},
                "pi5": {"status": "unchanged", "cause": "deploys/pi.py: pi5 already runs"},
            },
            "deploys": [{"deploy": "deploys/nas.py", "error": "boom"}],
        }
    )  # fmt: skip
    assert lines == [
        "nixpush check: drift found (exit 2) in 12.3s, 2 hosts",
        f"  pi4: drifted: runs {OLD}, wants {NEW}",
        "  pi5: unchanged: deploys/pi.py: pi5 already runs",
        "  deploys/nas.py: error: boom",
    ]


# -- files -----------------------------------------------------------------------------


def test_report_id_is_utc_and_sorts_as_time():
    when = datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    assert report.report_id(when, "check") == "20250102T030405.000678Z-check"


def test_write_report_writes_the_run_and_latest(tmp_path):
    data = {"id": "20250102T030405.000678Z-check", "mode": "check", "hosts": {}}
    path = report.write_report(tmp_path / "reports", data)
    assert path == tmp_path / "reports" / "20250102T030405.000678Z-check.json"
    assert json.loads(path.read_text()) == data
    assert json.loads((tmp_path / "reports" / "latest.json").read_text()) == data
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [path.name, "latest.json"]


def test_prune_keeps_the_newest_n_and_their_logs(tmp_path):
    names = [f"2025010{day}T000000.000000Z-{mode}" for day in range(1, 6) for mode in ("check",)]
    for name in names:
        (tmp_path / f"{name}.json").write_text("{}")
        (tmp_path / f"{name}.log").write_text("")
    (tmp_path / "latest.json").write_text("{}")
    (tmp_path / "notes.json").write_text("{}")

    removed = report.prune_reports(tmp_path, keep=2)

    assert [p.stem for p in removed] == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(f"{n}.json" for n in names[3:]), *(f"{n}.log" for n in names[3:]),
         "latest.json", "notes.json"]
    )  # fmt: skip


# -- the lock --------------------------------------------------------------------------


def _hold(path: str, ready: Any, release: Any) -> None:
    with runner.run_lock(Path(path), wait=0) as locked:
        assert locked
        ready.set()
        release.wait(10)


def test_lock_is_exclusive_across_processes_and_bounded_by_wait(tmp_path):
    lock = tmp_path / "state" / "lock"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(lock), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with runner.run_lock(lock, wait=0.3) as locked:
            assert not locked
        assert 0.3 <= time.monotonic() - started < 2
    finally:
        release.set()
        holder.join(10)
    with runner.run_lock(lock, wait=0) as locked:
        assert locked  # released when its holder ended


def _hold_for(path: str, ready: Any, seconds: float) -> None:
    with runner.run_lock(Path(path), wait=0) as locked:
        assert locked
        ready.set()
        time.sleep(seconds)


def test_a_second_run_waits_for_the_lock_then_runs(tmp_path):
    lock = tmp_path / "lock"
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_for, args=(str(lock), ready, 0.5))
    holder.start()
    assert ready.wait(10)
    started = time.monotonic()
    with runner.run_lock(lock, wait=10) as locked:
        assert locked
        assert time.monotonic() - started > 0.2
    holder.join(10)


# -- main ------------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A directory with an inventory and the deploy files, as the runner's working directory."""
    (tmp_path / "deploys").mkdir()
    for name in ("inventory.py", "deploys/nas.py", "deploys/secrets.py", "deploys/pi.py"):
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_pyinfra(monkeypatch, answers: dict[str, tuple[int, dict[str, Any] | None, str]]):
    """Stand in for run_local: record argument lists, write each deploy's summary file."""
    calls: list[dict[str, Any]] = []

    def fake(args, *, input=None, env=None, check=False, timeout=None, pass_fds=()):
        calls.append({"args": list(args), "env": env, "input": input})
        if args[0] == "git":
            return subprocess.CompletedProcess(args, 0, "v1-2-gabc\n", "")
        code, summary_data, log = answers[args[4]]
        if summary_data is not None:
            Path(env["NIXPUSH_REPORT_FILE"]).write_text(json.dumps(summary_data))
        return subprocess.CompletedProcess(args, code, json.dumps(plan_json()), log)

    monkeypatch.setattr(runner, "run_local", fake)
    monkeypatch.setattr(runner, "find_program", lambda name: f"/venv/bin/{name}")
    return calls


def test_check_runs_each_deploy_dry_and_reports_drift(checkout, monkeypatch, capsys):
    calls = fake_pyinfra(
        monkeypatch,
        {
            "deploys/nas.py": (0, summary(nas={"status": "unchanged", "cause": ""}), ""),
            "deploys/secrets.py": (0, None, ""),
            "deploys/pi.py": (0, summary(pi4=target("planned", "would switch")), ""),
        },
    )

    code = runner.main(["check", "--state-dir", str(checkout / "state")])

    assert code == ExitCode.DRIFT
    pyinfra_calls = [c["args"] for c in calls if c["args"][0] != "git"]
    assert pyinfra_calls == [
        ["/venv/bin/pyinfra", "--dry", "--json", "inventory.py", f"deploys/{name}.py"]
        for name in ("nas", "secrets", "pi")
    ]
    assert all(c["input"] is None for c in calls)  # run_local gives an empty stdin
    latest = json.loads((checkout / "state" / "reports" / "latest.json").read_text())
    assert latest["exit_code"] == 2 and latest["mode"] == "check"
    assert latest["nixpush_revision"] == "v1-2-gabc"
    assert latest["hosts"]["pi4"]["status"] == "drifted"
    out = capsys.readouterr().out
    assert out.startswith("nixpush check: drift found (exit 2)")
    assert f"pi4: drifted: runs {OLD}, wants {NEW}" in out


def test_deploy_is_never_interactive_and_passes_limits(checkout, monkeypatch):
    calls = fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(), "")})
    code = runner.main(
        ["deploy", "--state-dir", str(checkout / "state"), "--limit", "pi4", "--limit", "pi5"]
    )
    assert code == ExitCode.OK
    assert calls[0]["args"] == [
        "/venv/bin/pyinfra", "-y", "--json", "inventory.py", "deploys/pi.py",
        "--limit", "pi4", "--limit", "pi5",
    ]  # fmt: skip


def test_a_locked_run_exits_75_and_writes_no_report(checkout, monkeypatch, capsys):
    fake_pyinfra(monkeypatch, {})
    state = checkout / "state"
    with runner.run_lock(state / "lock", wait=0) as locked:
        assert locked
        code = runner.main(["check", "--state-dir", str(state)])
    assert code == ExitCode.LOCKED
    assert "already running" in capsys.readouterr().err
    assert not (state / "reports").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sometimes"],
        ["check", "--wait", "-1"],
        ["check", "--keep", "0"],
        ["check", "--inventory", "nowhere.py"],
        ["deploy", "--deploy", "deploys/missing.py"],
        ["check", "--wait", "soon"],
    ],
)
def test_usage_errors_exit_64(checkout, monkeypatch, argv):
    fake_pyinfra(monkeypatch, {})
    assert runner.main([*argv, "--state-dir", str(checkout / "state")]) == ExitCode.USAGE


def test_help_exits_0_and_lists_the_exit_codes(capsys):
    assert runner.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "75  already running" in out and "2   drift found" in out


# -- refusals: a report that cannot be written, modes, the deploys' lock ---------


def test_a_report_that_cannot_be_written_exits_1_after_the_summary(checkout, monkeypatch, capsys):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(), "")})

    def full_disk(reports, result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", full_disk)
    code = runner.main(["deploy", "--state-dir", str(checkout / "state")])

    assert code == ExitCode.FAILED  # not 64: the deploys ran, and what they did is printed
    captured = capsys.readouterr()
    assert captured.out.startswith("nixpush deploy: ")
    assert "report:" not in captured.out
    assert (
        f"nixpush-run: error: the report could not be written in {checkout / 'state' / 'reports'}"
        ": [Errno 28] No space left on device"
    ) in captured.err


def test_reports_logs_and_state_dir_are_for_the_owner_and_its_group(checkout, monkeypatch):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(), "")})
    state = checkout / "state"
    old = os.umask(0o077)  # systemd's UMask=0077 for the unit
    try:
        assert runner.main(["deploy", "--state-dir", str(state)]) == ExitCode.OK
    finally:
        os.umask(old)
    assert state.stat().st_mode & 0o777 == 0o750
    assert (state / "reports").stat().st_mode & 0o777 == 0o750
    files = list((state / "reports").iterdir())
    assert {p.suffix for p in files} == {".json", ".log"}
    assert {p.stat().st_mode & 0o777 for p in files} == {0o640}


def test_deploys_run_by_nixpush_run_are_told_it_holds_the_lock(checkout, monkeypatch):
    calls = fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(), "")})
    state = str(checkout / "state")
    runner.main(["deploy", "--state-dir", state])
    (env,) = [c["env"] for c in calls if c["args"][0] != "git"]
    assert env["NIXPUSH_LOCK_HELD"] == f"{state}/lock"
    assert env["NIXPUSH_STATE_DIR"] == state


def test_deploys_run_by_nixpush_run_keep_their_evaluation_cache_in_the_state_dir(
    checkout, monkeypatch
):
    monkeypatch.delenv("NIXPUSH_CACHE_DIR", raising=False)
    calls = fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(), "")})
    state = str(checkout / "state")
    runner.main(["deploy", "--state-dir", state])
    monkeypatch.setenv("NIXPUSH_CACHE_DIR", "/srv/cache")
    runner.main(["deploy", "--state-dir", state])
    envs = [c["env"] for c in calls if c["args"][0] != "git"]
    assert [env["NIXPUSH_CACHE_DIR"] for env in envs] == [f"{state}/cache", "/srv/cache"]


def test_a_failed_run_writes_metrics_and_runs_on_failure_with_the_report(
    checkout, monkeypatch, capsys
):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (1, summary(pi4=target("failed", "boom")), "")})
    alert = checkout / "alert.sh"
    alert.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {checkout}/argv\ncat > {checkout}/stdin\n')
    alert.chmod(0o755)
    state, textfiles = checkout / "state", checkout / "textfiles"

    code = runner.main([
        "deploy", "--state-dir", str(state), "--metrics-dir", str(textfiles),
        f"--on-failure={alert}", "--on-failure=-d",
    ])  # fmt: skip

    assert code == ExitCode.FAILED
    report_path = (
        state / "reports" / f"{json.loads((state / 'reports/latest.json').read_text())['id']}.json"
    )
    assert (checkout / "argv").read_text() == f"-d\n{report_path}\n"
    assert "pi4: failed: deploys/pi.py: boom" in (checkout / "stdin").read_text()
    prom = (textfiles / "nixpush_deploy.prom").read_text()
    assert 'nixpush_run_exit_code{mode="deploy"} 1.0' in prom
    assert 'nixpush_host_status{host="pi4",mode="deploy",status="failed"} 1.0' in prom
    assert "nixpush-run: on_failure ran" in capsys.readouterr().err


def test_an_ok_run_alerts_nobody_and_a_failed_alert_keeps_the_exit_code(
    checkout, monkeypatch, capsys
):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(pi4=target("unchanged")), "")})
    state = checkout / "state"
    assert runner.main(["deploy", "--state-dir", str(state), "--on-failure=/bin/false"]) == 0
    assert "on_failure" not in capsys.readouterr().err

    fake_pyinfra(monkeypatch, {"deploys/pi.py": (1, summary(pi4=target("failed", "boom")), "")})
    assert runner.main(["deploy", "--state-dir", str(state), "--on-failure=/bin/false"]) == 1
    assert "nixpush-run: on_failure /bin/false exited 1" in capsys.readouterr().err


def test_metrics_that_cannot_be_written_are_reported_not_a_failure(checkout, monkeypatch, capsys):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(pi4=target("unchanged")), "")})
    (checkout / "file").write_text("")
    code = runner.main(
        ["deploy", "--state-dir", str(checkout / "state"), "--metrics-dir", str(checkout / "file")]
    )
    assert code == 0
    assert "nixpush-run: error: metrics not written:" in capsys.readouterr().err


# -- hosts pyinfra could not connect to --------------------------------------------------

# pyinfra 3.10's log when none of the hosts could be reached (padding, colours, a traceback).
NO_HOSTS_LOG = (
    "--> Loading config...\n--> Loading inventory...\n--> Connecting to hosts...\n"
    "    Failed to load host keys from /root/.ssh/known_hosts: [Errno 2] No such file\n"
    "    [\x1b[1mpi4\x1b[0m]    \x1b[31mCould not resolve hostname ([Errno -2] Name or service "
    "not known)\x1b[0m\n"
    "    [\x1b[1mgrill\x1b[0m]  \x1b[31mCould not connect ([Errno 101] Network is unreachable)"
    "\x1b[0m\n"
    "Exception (client): Error reading SSH protocol banner\nTraceback (most recent call last):\n"
    "EOFError\n"
    "    [\x1b[1mlaptop\x1b[0m] \x1b[31mSSH error (Error reading SSH protocol banner)\x1b[0m\n"
    "    [\x1b[1mnas\x1b[0m]    \x1b[31mAuthentication error (key=/root/.ssh/id) "
    "(Authentication failed.)\x1b[0m\n"
    "--> Disconnecting from hosts...\n--> pyinfra error: No hosts remaining!\n"
)


def test_connect_errors_reads_every_reason_pyinfra_gives():
    assert report.connect_errors(NO_HOSTS_LOG) == {
        "pi4": "Could not resolve hostname ([Errno -2] Name or service not known)",
        "grill": "Could not connect ([Errno 101] Network is unreachable)",
        "laptop": "SSH error (Error reading SSH protocol banner)",
        "nas": "Authentication error (key=/root/.ssh/id) (Authentication failed.)",
    }
    # Connected hosts and a host's own lines after connecting are no connect errors; a
    # builder connected later (at prepare time) is, by pyinfra's words.
    later = (
        "--> Connecting to hosts...\n    [pi4] Connected\n--> Preparing operations...\n"
        "    [pi4] cannot deploy: builder nas is unreachable\n"
        "    [nas] Could not connect (timed out)\n"
    )
    assert report.connect_errors(later) == {"nas": "Could not connect (timed out)"}


def test_without_a_summary_every_host_pyinfra_could_not_reach_is_failed_or_offline():
    hosts = report.host_outcomes(None, None, NO_HOSTS_LOG, executed=True, offline_ok={"laptop"})
    assert hosts["pi4"] == HostOutcome(
        "failed", "could not connect: Could not resolve hostname ([Errno -2] Name or service "
        "not known)"
    )  # fmt: skip
    assert hosts["grill"].cause == (
        "could not connect: Could not connect ([Errno 101] Network is unreachable)"
    )
    assert hosts["laptop"] == HostOutcome("offline", report.OFFLINE)


def test_no_hosts_remaining_still_reports_every_host_everywhere(checkout, monkeypatch, capsys):
    # `nixpush-run deploy --limit pi4` with pi4's name gone: pyinfra stops before any deploy
    # code runs, so no summary; the host is still failed, with why, everywhere.
    log = "--> Connecting to hosts...\n    [pi4] Could not resolve hostname (gaierror)\n" + (
        "--> pyinfra error: No hosts remaining!\n"
    )
    fake_pyinfra(monkeypatch, {name: (1, None, log) for name in runner.SCHEDULE["deploy"]})
    alert = checkout / "alert.sh"
    alert.write_text(f"#!/bin/sh\ncat > {checkout}/stdin\n")
    alert.chmod(0o755)
    state, textfiles = checkout / "state", checkout / "textfiles"
    code = runner.main([
        "deploy", "--limit", "pi4", "--state-dir", str(state), "--metrics-dir", str(textfiles),
        f"--on-failure={alert}",
    ])  # fmt: skip
    assert code == ExitCode.FAILED
    cause = "could not connect: Could not resolve hostname (gaierror)"
    latest = json.loads((state / "reports" / "latest.json").read_text())
    assert latest["hosts"]["pi4"]["status"] == "failed"
    assert latest["hosts"]["pi4"]["cause"].endswith(cause)
    assert all(d["error"] is None for d in latest["deploys"])  # the host says why
    out = capsys.readouterr().out
    assert "nixpush deploy: FAILED (exit 1)" in out and ", 1 hosts" in out
    line = next(line for line in out.splitlines() if line.startswith("  pi4: "))
    assert line.startswith("  pi4: failed: deploys/") and line.endswith(cause)
    assert line.strip() in (checkout / "stdin").read_text()
    prom = (textfiles / "nixpush_deploy.prom").read_text()
    assert 'nixpush_host_status{host="pi4",mode="deploy",status="failed"} 1.0' in prom


def test_a_lone_offline_ok_host_away_is_offline_and_no_failure(checkout, monkeypatch, capsys):
    (checkout / "inventory.py").write_text(
        "hosts = [('laptop', {'offline_ok': True, 'ssh_strict_host_key_checking': 'yes'})]\n"
    )
    # pyinfra's CLI keeps each file's code by its name: another test's inventory.py was empty.
    monkeypatch.setattr(pyinfra_cli.util, "PYTHON_CODES", {})
    assert runner.offline_ok_hosts("inventory.py") == {"laptop"}
    assert runner.offline_ok_hosts("missing.py") == set()
    log = "--> Connecting to hosts...\n    [laptop] Could not connect (timed out)\n" + (
        "--> pyinfra error: No hosts remaining!\n"
    )
    fake_pyinfra(monkeypatch, {name: (1, None, log) for name in runner.SCHEDULE["deploy"]})
    state = checkout / "state"
    assert runner.main(["deploy", "--limit", "laptop", "--state-dir", str(state)]) == 0
    latest = json.loads((state / "reports" / "latest.json").read_text())
    assert latest["hosts"]["laptop"]["status"] == "offline"


# -- alerts that cannot change the result --------------------------------------------------


def test_an_alert_printing_undecodable_bytes_keeps_the_exit_code(checkout, monkeypatch, capsys):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (1, summary(pi4=target("failed", "boom")), "")})
    alert = checkout / "alert.sh"
    alert.write_text("#!/bin/sh\nprintf 'bad \\377\\376 bytes\\n' >&2\nexit 3\n")
    alert.chmod(0o755)
    code = runner.main(["deploy", "--state-dir", str(checkout / "state"), f"--on-failure={alert}"])
    assert code == ExitCode.FAILED
    assert f"nixpush-run: on_failure {alert} exited 3: bad \ufffd\ufffd bytes" in (
        capsys.readouterr().err
    )
    # An argument no process can take (a NUL) is said, not raised.
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (1, summary(pi4=target("failed", "boom")), "")})
    assert runner.main(["deploy", "--state-dir", str(checkout / "state"), "--on-failure=a\0b"]) == 1
    assert "nixpush-run: on_failure a\0b could not run:" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_still_gives_metrics_and_the_alert(
    checkout, monkeypatch, capsys
):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(pi4=target("unchanged")), "")})

    def full_disk(reports, result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", full_disk)
    alert = checkout / "alert.sh"
    alert.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {checkout}/argv\ncat > {checkout}/stdin\n')
    alert.chmod(0o755)
    state, textfiles = checkout / "state", checkout / "textfiles"
    code = runner.main([
        "deploy", "--state-dir", str(state), "--metrics-dir", str(textfiles),
        f"--on-failure={alert}",
    ])  # fmt: skip
    assert code == ExitCode.FAILED  # every host was fine, but the run left no record
    prom = (textfiles / "nixpush_deploy.prom").read_text()
    assert 'nixpush_run_exit_code{mode="deploy"} 1.0' in prom
    assert 'nixpush_host_status{host="pi4",mode="deploy",status="unchanged"} 1.0' in prom
    stdin = (checkout / "stdin").read_text()
    assert "nixpush deploy: FAILED (exit 1)" in stdin
    assert (
        f"report: missing: the report could not be written in {state / 'reports'}: "
        "[Errno 28] No space left on device"
    ) in stdin
    assert (checkout / "argv").read_text().strip().startswith(str(state / "reports"))
    assert "nixpush-run: on_failure ran" in capsys.readouterr().err


def test_metrics_are_written_even_when_the_success_times_cannot_be_kept(
    checkout, monkeypatch, capsys
):
    fake_pyinfra(monkeypatch, {"deploys/pi.py": (0, summary(pi4=target("unchanged")), "")})
    state, textfiles = checkout / "state", checkout / "textfiles"
    (state / "metrics-deploy.json").mkdir(parents=True)  # cannot be replaced by a file
    code = runner.main(["deploy", "--state-dir", str(state), "--metrics-dir", str(textfiles)])
    assert code == 0
    assert (
        'nixpush_run_exit_code{mode="deploy"} 0.0'
        in (textfiles / "nixpush_deploy.prom").read_text()
    )
    assert "nixpush-run: error: metrics written, but the success times were not kept in" in (
        capsys.readouterr().err
    )


def test_a_full_state_dir_loses_the_log_not_the_run(tmp_path):
    log = runner.RunLog(tmp_path / "missing-dir" / "x.log")  # cannot even be created
    log.write("anything")
    log.close()
    with runner.scratch_dir(str(tmp_path / "missing-dir")) as scratch:
        assert Path(scratch).is_dir()  # the system's temporary directory instead
