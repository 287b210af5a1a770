"""Safe switching without a fleet: command builders (hostile values arrive quoted), the follow
protocol, the outcome logic, data parsing, and the rolled-back status in summaries and reports."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.exceptions import ConnectError

from operations.core import process
from operations.core.models import Action, Plan, Safety
from operations.core.summary import RunSummary
from operations.data.health import HealthCheck
from operations.push import activate, switch
from operations.push.activate import Outcome, judge
from operations.push.switch import ActivationRun, SystemGenerations, parse_follow
from operations.run import report

OLD, NEW = "/nix/store/aaa-nixos-system-pi4-1", "/nix/store/bbb-nixos-system-pi4-2"
HOSTILE = "/nix/store/x'; touch /tmp/pwned; echo '$(id)"


def plan(action: str = "switch", desired: str = NEW, **kw: Any) -> Plan:
    fields: dict[str, Any] = {
        "target": "pi4", "builder": "nas", "attr": "f#x", "desired": desired,
        "current": OLD, "profile": OLD, "action": action,
    }  # fmt: skip
    fields.update(kw)
    fields["action"] = Action(fields["action"])
    return Plan(**fields)


def run_of(action: str = "switch", desired: str = NEW, systemd: bool = False) -> ActivationRun:
    return ActivationRun(
        id="20250101T000000-abcd", action=action, desired=desired, generation=None,
        safety=Safety(confirm_timeout=30, activation_timeout=600), systemd=systemd,
    )  # fmt: skip


def argv(command: StringCommand) -> list[str]:
    """The command as the target's shell splits it."""
    return shlex.split(command.get_raw_value())


# -- command builders ------------------------------------------------------------------


def test_setsid_launch_installs_the_program_then_starts_it_in_a_new_session():
    args = argv(switch.launch_command(run_of()))
    assert args[:2] == ["sh", "-c"] and args[2] == switch.INSTALL
    assert args[3:] == [
        "nixpush-launch", "/run/nixpush/20250101T000000-abcd", switch.PROGRAM_SHA256, "630",
        "", "0",  # the controller; no handover: setsid's program inherits the launch's lock
        "setsid", "-f", "sh", "/run/nixpush/20250101T000000-abcd/program",
        "/run/nixpush/20250101T000000-abcd", "switch", NEW, "", "1", "30", "600", "", "",
    ]  # fmt: skip


def test_systemd_launch_is_a_transient_unit_logging_to_the_journal():
    args = argv(switch.launch_command(run_of(systemd=True)))
    assert args[7:9] == ["", "1"]  # the controller; a unit takes the lock over (handover)
    starter = args[9:]
    assert starter[:9] == [
        "systemd-run", "--unit=nixpush-switch-20250101T000000-abcd", "--collect",
        "--no-ask-password", "--service-type=exec",
        "--property=TimeoutStopSec=1230",  # a stop rolls back: two activations' time
        "--quiet", "--setenv=PATH", "sh",
    ]  # fmt: skip
    assert "--pipe" not in args and "--wait" not in args
    assert starter[9:] == [
        "/run/nixpush/20250101T000000-abcd/program",
        "/run/nixpush/20250101T000000-abcd", "switch", NEW, "", "1", "30", "600", "", "",
    ]  # fmt: skip


def test_hostile_values_arrive_as_single_arguments():
    run = run_of(desired=HOSTILE)
    assert HOSTILE in argv(switch.launch_command(run))
    assert HOSTILE in argv(switch.launch_command(run_of(desired=HOSTILE, systemd=True)))
    cause = "health check 'x; reboot' failed: $(id)\nsecond line"
    rejected = argv(switch.reject_command(run, cause))
    assert rejected[-1] == cause.replace("\n", " ")


def test_the_launch_really_runs_hostile_values_as_data(tmp_path):
    # The rendered command, run by a real shell with a stand-in starter, passes values intact.
    run = ActivationRun(
        id="x", action="switch", desired=HOSTILE, generation=None, safety=Safety(), systemd=False
    )
    command = StringCommand(
        "sh", "-c", QuoteString(switch.INSTALL), "nixpush-launch",
        QuoteString(str(tmp_path / "runs" / "x")), sha256("echo program"), "1",
        QuoteString(HOSTILE), "0", "sh", "-c", QuoteString('printf "%s\\n" "$@" > "$0"'),
        QuoteString(str(tmp_path / "args")), *switch.program_args(run),
    )  # fmt: skip
    subprocess.run(
        ["sh", "-c", command.get_raw_value()], input="echo program", text=True, check=True
    )
    assert (tmp_path / "runs" / "x" / "program").read_text() == "echo program"
    assert (tmp_path / "runs" / "x").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "args").read_text().splitlines()[2] == HOSTILE
    assert not (tmp_path / "pwned").exists()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stand_in_program(monkeypatch: pytest.MonkeyPatch, text: str) -> str:
    """``text`` as the program the launch accepts (its checksum)."""
    monkeypatch.setattr(switch, "PROGRAM_SHA256", sha256(text))
    return text


def test_rollback_action_switches_to_an_existing_generation():
    rollback_plan = plan("rollback", attr="/nix/var/nix/profiles/system-11-link", desired=OLD)
    run = ActivationRun.create(rollback_plan, Safety(), systemd=False)
    assert (run.action, run.generation) == ("switch", 11)
    assert [a.obj for a in switch.program_args(run)][1:5] == ["switch", OLD, "11", "1"]


def test_boot_never_arms_a_rollback():
    run = ActivationRun.create(plan("boot"), Safety(rollback=True), systemd=False)
    assert not run.rolls_back
    assert [a.obj for a in switch.program_args(run)][4] == "0"


def test_follow_and_confirm_commands():
    run = run_of(systemd=True)
    assert argv(switch.follow_command(run, 12, "activating", 5))[3:] == [
        "nixpush-follow", run.dir, "12", "activating", "5", run.unit,
    ]  # fmt: skip
    assert argv(switch.follow_command(run_of(), 0, "", 5))[-1] == ""  # no unit: the file
    assert argv(switch.confirm_command(run)) == [
        "sh", "-c", switch.CONFIRM, "nixpush-confirm", run.dir,
    ]  # fmt: skip


def _local_host() -> Any:
    inventory = Inventory((["@local"], {}))
    State(inventory, Config())
    return inventory.get_host("@local")


def test_a_fresh_login_runs_over_a_connection_of_its_own_and_closes_it():
    host = _local_host()
    command = StringCommand("echo", "hi", "&&", "cat")
    assert process.fresh_login_run(host, command, sudo=False, timeout=5, stdin="in\n") == (
        True, ["hi", "in"],
    )  # fmt: skip
    assert process.fresh_login_run(host, StringCommand("exit 3"), sudo=False, timeout=5) == (
        False, [],
    )  # fmt: skip
    assert not host.connected  # pyinfra's own connection was never made nor used


class _Refusing:
    """A connector whose connection fails the way pyinfra's ssh connector says it does."""

    message = ""
    closed = 0

    def __init__(self, state: Any, host: Any) -> None:
        self.client = SimpleNamespace(close=self._close, get_transport=lambda: None)

    def _close(self) -> None:
        type(self).closed += 1

    def connect(self) -> None:
        raise ConnectError(self.message)


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        ("Authentication error (username=beau) (Authentication failed.)",
         (False, ["the login was refused: Authentication error (username=beau) "
                  "(Authentication failed.)"])),
        ("SSH host key error (Host key for h does not match.)",
         (False, ["the login was refused: SSH host key error (Host key for h does not match.)"])),
        ("Could not connect ([Errno 113] No route to host)", None),
    ],
)  # fmt: skip
def test_a_fresh_login_tells_a_refused_login_from_no_connection(message, answer):
    connector = type("Refusing", (_Refusing,), {"message": message})
    host = SimpleNamespace(name="pi4", state=None, connector=connector(None, None))
    assert process.fresh_login_run(host, StringCommand("true"), sudo=True, timeout=1) == answer  # type: ignore[arg-type]
    assert connector.closed == 1


def test_a_fresh_login_that_hangs_is_no_answer(monkeypatch):
    monkeypatch.setattr(process, "CONNECT_TIMEOUT", 0)
    host = _local_host()
    started = time.monotonic()
    assert process.fresh_login_run(host, StringCommand("sleep 5"), sudo=False, timeout=0.3) is None
    assert time.monotonic() - started < 3


# -- following and judging -------------------------------------------------------------


def test_parse_follow_splits_output_from_status_at_the_last_mark():
    progress = parse_follow([
        "line 1", switch.STATUS_MARK, "fake=1", "line 2",
        switch.STATUS_MARK, "state=awaiting-confirmation", "timeout=30",
        f"current={NEW}", f"profile={NEW}",
    ])  # fmt: skip
    assert progress.lines == ["line 1", switch.STATUS_MARK, "fake=1", "line 2"]
    assert progress.state == "awaiting-confirmation"
    assert progress.status["current"] == NEW
    assert parse_follow([]).state == "starting"


def status(state: str, current: str = NEW, profile: str = NEW, cause: str = "") -> dict[str, str]:
    return {"state": state, "current": current, "profile": profile, "cause": cause}


@pytest.mark.parametrize(
    ("the_plan", "the_status", "note", "expected"),
    [
        (plan(), status("confirmed"), "", Outcome("deployed")),
        (plan("test"), status("confirmed", profile=OLD), "", Outcome("deployed")),
        (plan("boot"), status("done", current=OLD), "", Outcome("deployed")),
        (plan("rollback"), status("confirmed"), "", Outcome("deployed")),
        (
            plan("rollback"), status("confirmed", profile=OLD), "",
            Outcome("failed", f"after rollback, the system profile is {OLD}"),
        ),
        (
            plan(), status("confirmed", current=OLD), "",
            Outcome("failed", f"after switch, /run/current-system is {OLD}"),
        ),
        (
            plan(), status("rolled-back", OLD, OLD, "switch-to-configuration switch exited 4"), "",
            Outcome("rolled-back", "switch-to-configuration switch exited 4"),
        ),
        (
            plan(), status("rolled-back", OLD, OLD, "no confirmation within 30s"),
            "a new SSH login to confirm failed: Permission denied",
            Outcome(
                "rolled-back",
                "no confirmation within 30s (a new SSH login to confirm failed: Permission denied)",
            ),
        ),
        (
            plan(), status("rolled-back", NEW, OLD, "no confirmation within 30s"), "",
            Outcome(
                "failed", f"rolled back after no confirmation within 30s, but it now runs {NEW}"
            ),
        ),
        (
            plan(), status("rollback-failed", NEW, OLD, "switch-to-configuration switch exited 4"),
            "", Outcome(
                "failed",
                "rolling back after switch-to-configuration switch exited 4 failed; "
                f"it now runs {NEW}",
            ),
        ),
        (
            plan(), status("failed", NEW, NEW, "switch-to-configuration switch exited 4"), "",
            Outcome(
                "failed",
                "switch-to-configuration switch exited 4 (rollback is off: the new system stays); "
                f"it now runs {NEW}",
            ),
        ),
        (
            plan(), {"state": "missing"}, "",
            Outcome("failed", "the activation did not start on the target"),
        ),
    ],
)  # fmt: skip
def test_judge(the_plan, the_status, note, expected):
    assert judge(the_plan, the_status, note) == expected


def test_judge_names_rollback_off_only_when_it_is_off():
    failed = status("failed", NEW, NEW, "the activation program was stopped (a signal) while x")
    off = judge(plan(), failed)
    assert off.cause.startswith(
        "the activation program was stopped (a signal) while x (rollback is off"
    )
    armed = judge(plan(), failed, rolls_back=True)
    assert "rollback is off" not in armed.cause
    assert "(the new system runs, unconfirmed: it did not roll back)" in armed.cause


# -- data, facts, --dry ----------------------------------------------------------------


def test_system_generations_fact():
    fact = SystemGenerations()
    found = fact.process([
        f"/nix/var/nix/profiles/system-11-link {OLD}",
        f"/nix/var/nix/profiles/system-12-link {NEW}",
        "current system-12-link",
    ])  # fmt: skip
    assert found == {"current": 12, "paths": {11: OLD, 12: NEW}}
    assert fact.process(["current"]) == {"current": None, "paths": {}}


def test_describe_says_what_is_armed_and_which_checks_run():
    check = HealthCheck(name="sshd", kind="units", units=("sshd.service",))
    assert activate.describe(plan(), Safety(), [check]) == [
        "rollback armed: the target rolls back unless confirmed within 30s over a new SSH "
        "login (activated as test; what it boots changes only once confirmed); activation "
        "timeout 600s",
        "health check sshd: units sshd.service active",
    ]
    assert activate.describe(plan("boot"), Safety(rollback=False), [])[0].startswith(
        "no automatic rollback for boot"
    )
    assert activate.describe(plan(current=NEW, profile=NEW), Safety(), [check]) == []


# -- summary and report ----------------------------------------------------------------


def test_summary_reports_rolled_back_apart_from_failed_and_deployed():
    class Host:
        def __init__(self, name: str) -> None:
            self.name, self.connected = name, True

    hosts = [Host(n) for n in ("pi4", "pi5", "pi6")]
    state = SimpleNamespace(
        inventory=hosts, failed_hosts={hosts[0], hosts[2]}, current_stage=99,
        is_host_in_limit=lambda h: True,
    )  # fmt: skip
    summary = RunSummary(state)  # type: ignore[arg-type]
    for name in ("pi4", "pi5", "pi6"):
        summary.planned(plan(target=name))
    summary.rolled_back("pi4", "no confirmation within 30s")
    summary.fail("pi6", "rolling back failed")
    assert summary.outcomes() == {
        "pi4": ("rolled-back", "no confirmation within 30s"),
        "pi5": ("deployed", f"switch {NEW}"),
        "pi6": ("failed", "rolling back failed"),
    }
    assert "pi4: rolled back: no confirmation within 30s" in summary.lines()
    assert summary.report()["hosts"]["pi4"]["status"] == "rolled-back"


def test_run_report_keeps_rolled_back_and_fails_the_run():
    entry = {"status": "rolled-back", "cause": "no confirmation within 30s", "action": "switch",
             "current": OLD, "profile": OLD, "desired": NEW}  # fmt: skip
    hosts = report.host_outcomes({"hosts": {"pi4": entry}}, None, "", executed=True)
    assert hosts["pi4"].status == "rolled-back"
    assert hosts["pi4"].paths["after"] == {"current": OLD, "profile": OLD}
    deploy = report.DeployResult("deploys/pi.py", 1, 1.0, hosts)
    merged = report.merge_hosts([deploy])
    assert report.exit_code("deploy", [deploy], merged) == report.ExitCode.FAILED


def follow(run_dir: Any, seen: int, known: str, wait: int) -> tuple[list[str], float]:
    """The follow command as a real shell runs it against ``run_dir``: lines and seconds."""
    command = StringCommand(
        "sh", "-c", QuoteString(switch.FOLLOW), "nixpush-follow", QuoteString(str(run_dir)),
        str(seen), QuoteString(known), str(wait), "",
    )  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        ["sh", "-c", command.get_raw_value()], capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines(), time.monotonic() - started


def test_follow_holds_lines_of_a_running_activation_until_its_wait_is_up(tmp_path):
    # New lines alone are no reason to answer: an activation's output comes at the state
    # that wants the controller, or every `wait` seconds while it runs (fewer round trips).
    (tmp_path / "output").write_text("one\ntwo\nthree\n")
    (tmp_path / "status").write_text("state=activating\n")
    lines, seconds = follow(tmp_path, 1, "", 1)
    progress = parse_follow(lines)
    assert progress.lines == ["two", "three"] and progress.state == "activating"
    assert 0.9 < seconds < 3
    assert not any(line.startswith("current=") for line in lines)  # links only at the end


def test_follow_answers_at_once_at_a_state_that_wants_the_controller(tmp_path):
    (tmp_path / "output").write_text("one\ntwo\n")
    (tmp_path / "status").write_text("state=awaiting-confirmation\ntimeout=30\n")
    lines, seconds = follow(tmp_path, 0, "", 5)
    progress = parse_follow(lines)
    assert progress.lines == ["one", "two"] and progress.state == "awaiting-confirmation"
    assert progress.status["timeout"] == "30" and seconds < 2
    (tmp_path / "status").write_text("state=confirmed\n")
    lines, seconds = follow(tmp_path, 2, "awaiting-confirmation", 5)
    progress = parse_follow(lines)
    assert progress.lines == [] and progress.state == "confirmed" and seconds < 2
    assert "current" in progress.status and "profile" in progress.status  # over: the links


def test_follow_counts_only_whole_lines(tmp_path):
    (tmp_path / "output").write_text("one\ntw")  # the program is writing its second line
    (tmp_path / "status").write_text("state=done\n")
    lines, _ = follow(tmp_path, 0, "", 1)
    assert parse_follow(lines).lines == ["one"]


def test_follow_waits_for_news_then_answers_what_it_has(tmp_path):
    (tmp_path / "output").write_text("one\n")
    (tmp_path / "status").write_text("state=awaiting-confirmation\ntimeout=30\n")
    lines, seconds = follow(tmp_path, 1, "awaiting-confirmation", 1)
    assert 0.9 < seconds < 3
    progress = parse_follow(lines)
    assert progress.lines == [] and progress.status["timeout"] == "30"


def test_follow_of_a_run_that_is_not_there(tmp_path):
    lines, _ = follow(tmp_path / "gone", 0, "starting", 1)
    assert parse_follow(lines).state == "missing"


def _sh(command: StringCommand, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``command`` run for real by this machine's shell, ``stdin`` on its standard input."""
    return subprocess.run(
        ["sh", "-c", command.get_raw_value()],
        input=stdin, capture_output=True, text=True, timeout=10,
    )  # fmt: skip


def test_launch_and_first_follow_are_one_round_trip(tmp_path, monkeypatch):
    # Launched for real, detached (setsid), with a stand-in program; the same command's output
    # is the first follow's answer: the program's first line and its state once the follow's
    # wait (1 s here) is up, the run still activating.
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path / "runs"))
    run = run_of()
    stand_in = stand_in_program(
        monkeypatch, 'echo "started $2"; printf "state=activating\\n" > "$1/status"; sleep 1'
    )
    done = _sh(switch.launch_and_follow_command(run, 1), stand_in)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == switch.LAUNCHED_MARK and switch.STATUS_MARK in lines  # then a follow's
    progress = parse_follow(lines[1:])
    assert progress.state in ("starting", "activating")  # as far as it got within the wait
    assert progress.lines in ([], ["started switch"])
    status = tmp_path / "runs" / run.id / "status"
    for _ in range(50):  # the program runs on, detached
        if status.exists():
            break
        time.sleep(0.1)
    assert status.read_text() == "state=activating\n"


def test_a_confirmation_brings_back_the_programs_answer_in_the_same_round_trip(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path))
    run = run_of()
    Path(run.dir).mkdir()
    (Path(run.dir) / "awaiting").touch()
    (Path(run.dir) / "status").write_text("state=awaiting-confirmation\n")
    (Path(run.dir) / "output").write_text("activated\n")
    # The program's side: it sees the confirmation and says so (in a fifth of a second).
    watcher = subprocess.Popen([
        "sh", "-c", 'while [ ! -e "$1/confirmed" ]; do sleep 0.05; done; '
        'echo confirmed >> "$1/output"; echo state=confirmed > "$1/status"', "-", run.dir,
    ])  # fmt: skip
    done = _sh(switch.confirm_and_follow_command(run, 1, 5))
    watcher.wait(timeout=5)
    assert done.returncode == 0, done.stderr
    answer = switch.split_at_mark(done.stdout.splitlines(), switch.CONFIRMED_MARK)[1]
    assert answer is not None
    progress = parse_follow(answer)
    assert progress.state == "confirmed" and progress.lines == ["confirmed"]
    # Sent again (its answer lost on the way): still a confirmation, not "too late".
    again = _sh(switch.confirm_and_follow_command(run, 2, 1)).stdout.splitlines()
    assert switch.split_at_mark(again, switch.CONFIRMED_MARK)[1] is not None


def test_a_confirmation_after_the_program_gave_up_is_too_late(tmp_path, monkeypatch):
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path))
    run = run_of()
    Path(run.dir).mkdir()
    (Path(run.dir) / "expired").touch()  # the program's timeout won the rename
    done = _sh(switch.confirm_and_follow_command(run, 0, 1))
    assert done.returncode != 0 and switch.TOO_LATE in done.stdout
    assert switch.split_at_mark(done.stdout.splitlines(), switch.CONFIRMED_MARK)[1] is None


def _stand_in_system(tmp_path: Path, dry_exit: int) -> str:
    """A system whose switch-to-configuration reports (reading stdin, as no real one does:
    it must not take the program's) and exits ``dry_exit``."""
    system = tmp_path / "system"
    (system / "bin").mkdir(parents=True)
    stc = system / "bin" / "switch-to-configuration"
    stc.write_text(f'#!/bin/sh\necho "would $1: stdin $(cat | wc -c) bytes"\nexit {dry_exit}\n')
    stc.chmod(0o755)
    return str(system)


def test_dry_activation_comes_first_in_the_launch_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path / "runs"))
    run = run_of(desired=_stand_in_system(tmp_path, 0))
    program = stand_in_program(monkeypatch, 'printf "state=done\\n" > "$1/status"')
    done = _sh(switch.dry_activate_and_launch_command(run, 5), program)
    assert done.returncode == 0, done.stderr
    lines = switch.decode_output(done.stdout.splitlines())
    assert lines[0] == "would dry-activate: stdin 0 bytes"  # the program's stdin untouched
    report, launch = switch.split_at_mark(lines, switch.DRY_ACTIVATED_MARK)
    assert report == ["would dry-activate: stdin 0 bytes"]
    assert launch is not None and launch[0] == switch.LAUNCHED_MARK
    assert (tmp_path / "runs" / run.id / "program").read_text() == program


NOT_UTF8 = b"caf\xe9 \xff\xfe line\n"


def test_a_dry_activation_printing_bytes_that_are_not_utf8_still_launches(tmp_path, monkeypatch):
    # Such a line once ended pyinfra's reading of the answer there: the marks after it were
    # lost, and the launch reported as failed while the target activated.
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path / "runs"))
    system = tmp_path / "system"
    (system / "bin").mkdir(parents=True)
    stc = system / "bin" / "switch-to-configuration"
    stc.write_bytes(b"#!/bin/sh\nprintf 'would \\351 \\377\\n'; echo next >&2\n")
    stc.chmod(0o755)
    run = run_of(desired=str(system))
    program = stand_in_program(monkeypatch, 'printf "state=done\n" > "$1/status"')
    done = subprocess.run(
        ["sh", "-c", switch.dry_activate_and_launch_command(run, 5).get_raw_value()],
        input=program.encode(), capture_output=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = done.stdout.decode("ascii")  # everything on the wire is ASCII: pyinfra reads it all
    lines = switch.decode_output(raw.splitlines())
    report, launch = switch.split_at_mark(lines, switch.DRY_ACTIVATED_MARK)
    assert report == ["would \ufffd \ufffd", "next"]
    assert launch is not None and launch[0] == switch.LAUNCHED_MARK


def test_follow_sends_output_lines_of_any_bytes_and_counts_them_like_the_target(tmp_path):
    (tmp_path / "output").write_bytes(b"one\n" + NOT_UTF8 + b"\xc3\xa9t\xc3\xa9\nlast\n")
    (tmp_path / "status").write_text("state=done\n")
    command = StringCommand(
        "sh", "-c", QuoteString(switch.FOLLOW), "nixpush-follow", QuoteString(str(tmp_path)),
        "1", "", "1", "",
    )  # fmt: skip
    done = subprocess.run(["sh", "-c", command.get_raw_value()], capture_output=True, check=True)
    raw = done.stdout.decode("ascii")
    progress = parse_follow(raw.splitlines())
    assert progress.lines == ["caf\ufffd \ufffd\ufffd line", "\u00e9t\u00e9", "last"]
    assert progress.state == "done"


def test_decode_output_reads_back_only_marked_hex_blocks():
    hexed = " 61 0a ff 0a"  # "a\n\xff\n"
    assert switch.decode_output(["x", switch.BYTES_MARK, hexed, "ab cd", "@@m@@"]) == [
        "x", "a", "\ufffd", "ab cd", "@@m@@",
    ]  # fmt: skip
    assert switch.decode_output([switch.BYTES_MARK, switch.STATUS_MARK]) == [switch.STATUS_MARK]
    assert switch.decode_output(["61 62"]) == ["61 62"]  # unmarked hex stays text


def test_a_follow_answer_without_a_state_waits_before_the_next(monkeypatch):
    # A cut-short answer (no status) once made the controller ask again at once, for 41 min.
    run = run_of()
    answers = iter(
        [(True, ["noise"]), (True, ["noise"]), (True, [switch.STATUS_MARK, "state=done"])]
    )
    sleeps: list[float] = []
    monkeypatch.setattr(activate.gevent, "sleep", sleeps.append)

    class Channel:
        host = SimpleNamespace(name="pi4", log_styled=lambda *a, **k: None)
        sudo = True

        def run(self, command, timeout, stdin=None):
            return next(answers)

    activation = activate.Activation(
        plan=plan(), safety=Safety(), checks=(), sudo=True, systemd=False
    )
    following = activate.Following()
    assert activate._follow(Channel(), run, activation, following) is None  # type: ignore[arg-type]
    assert following.known == "done" and sleeps == [1, 1]


def test_a_failed_dry_activation_launches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path / "runs"))
    run = run_of(desired=_stand_in_system(tmp_path, 3))
    done = _sh(switch.dry_activate_and_launch_command(run, 5), "echo never")
    assert done.returncode == 3
    assert switch.split_at_mark(done.stdout.splitlines(), switch.DRY_ACTIVATED_MARK)[1] is None
    assert not (tmp_path / "runs").exists()  # no run directory: nothing started


def test_a_launch_that_fails_is_not_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(switch, "RUN_ROOT", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / run_of().id).mkdir()  # taken: mkdir fails, nothing starts
    done = _sh(switch.launch_and_follow_command(run_of(), 5), "echo never")
    assert done.returncode != 0
    assert switch.LAUNCHED_MARK not in done.stdout and switch.STATUS_MARK not in done.stdout


def test_a_fresh_login_closes_every_proxyjump_hop():
    closed: list[str] = []

    class Transport:
        def __init__(self, name: str, sock: Any) -> None:
            self.name, self.sock = name, sock

        def close(self) -> None:
            closed.append(self.name)

    def channel_on(transport: Transport) -> paramiko.Channel:
        channel = paramiko.Channel(0)
        channel.transport = transport  # type: ignore[assignment]
        return channel

    first_hop = Transport("hop1", sock=object())  # a plain socket: the end of the chain
    second_hop = Transport("hop2", sock=channel_on(first_hop))
    target = Transport("target", sock=channel_on(second_hop))
    client = SimpleNamespace(get_transport=lambda: target, close=lambda: closed.append("client"))
    process._close_login(client)
    assert closed == ["client", "hop2", "hop1"]


# -- the state names: switch.py's, the programs' and the README's -----------------------


def _shell(name: str) -> str:
    return (Path(switch.__file__).parent / name).read_text()


def test_the_states_the_program_writes_are_switch_pys():
    written = set(re.findall(r'^\s*(?:\[.*\] && )?status "?([a-z-]+)"?', _shell("switch.sh"), re.M))
    assert written == set(switch.STATES) - {"missing"}
    assert set(switch.STATES) == {*switch.TRANSIENT, switch.AWAITING, *switch.TERMINAL}
    assert len(switch.STATES) == len(set(switch.STATES))


def test_the_follow_program_names_the_transient_and_terminal_states_of_switch_py():
    cases = re.findall(r"^\s*(?:case \$now in )?([a-z|-]+)\)", _shell("follow.sh"), re.M)
    assert [case.split("|") for case in cases] == [list(switch.TRANSIENT), list(switch.TERMINAL)]


def test_the_code_readme_lists_every_state():
    readme = (Path(switch.__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| state | who writes it |") :].split("\n\n")[0]
    listed = re.findall(r"^\| `([a-z-]+)` \|", table, re.M)
    assert listed == list(switch.STATES)
