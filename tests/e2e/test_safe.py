"""
Safe switching on the bench: `pyinfra <inventory> deploys/pi.py` as a user runs it, with links
cut during activations, configurations that break a Pi's network or sshd, failing activations
and health checks, and a controller killed mid-activation; checked on the hosts afterwards.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra
from tests.e2e.test_pi import current, current_configs, desired_path, output, profile

PI = "deploys/pi.py"
KNOBS = (
    "failActivation", "failDryActivation", "slowActivation", "breakNetwork", "breakSsh",
    "padding", "failBoot", "systemdBoot",
)  # fmt: skip
FAST = ("--data", "confirm_timeout=10", "--data", "activation_timeout=60")
_count = itertools.count(1)


@pytest.fixture
def good(push_ready: None) -> Iterator[dict[str, str]]:
    """Both Pis freshly deployed with a configuration without knobs: what a rollback returns to."""
    wanted = {name: configure(name) for name in ("pi4", "pi5")}
    result = deploy()
    assert result.returncode == 0, output(result)
    yield wanted
    for h in fleet.PIS:
        fleet.run(["ip", "link", "set", h.veth, "up"], check=False)
        fleet.set_link(h, up=True)
    # No knob outlives its test: a later test's deploy must not break the Pi again.
    configs = current_configs()
    fleet.set_flake_configs(
        {
            name: {k: v for k, v in attrs.items() if k not in KNOBS}
            for name, attrs in configs.items()
        }
    )


def configure(name: str, **knobs: str | bool) -> str:
    """A never-deployed configuration for ``name`` with exactly ``knobs``; its store path."""
    configs = current_configs()
    base = {k: v for k, v in configs[name].items() if k not in KNOBS}
    configs[name] = {**base, "version": f"{uuid.uuid4().hex[:6]}-{next(_count)}", **knobs}
    fleet.set_flake_configs(configs)
    return desired_path(name)


def deploy(*args: str, inventory: str = BENCH_INVENTORY, env: dict[str, str] | None = None):
    return pyinfra("-y", inventory, PI, *args, env={**bench_sops.env(), **(env or {})})


def start_deploy(*args: str) -> subprocess.Popen[str]:
    exe = str(Path(sys.executable).with_name("pyinfra"))
    return subprocess.Popen(
        [exe, "-y", BENCH_INVENTORY, PI, *args],
        cwd=fleet.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, env=bench_sops.env(),
    )  # fmt: skip


def latest_state(name: str) -> str:
    """The state of the host's newest activation run, read from inside it (no network)."""
    script = 'd=$(ls -1d /run/nixpush/*/ 2>/dev/null | tail -n 1); [ -n "$d" ] && cat "$d/status"'
    result = fleet.run(fleet.in_host(fleet.host(name), ["sh", "-c", script]), check=False)
    states = [line[6:] for line in result.stdout.splitlines() if line.startswith("state=")]
    return states[0] if states else ""


def run_dirs(name: str) -> int:
    result = fleet.run(
        fleet.in_host(fleet.host(name), ["sh", "-c", "ls /run/nixpush 2>/dev/null"]), check=False
    )
    return len(result.stdout.split())


def wait_for_state(name: str, state: str, timeout: float) -> float:
    """Seconds until the host's newest activation run is in ``state``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if latest_state(name) == state:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached {state}: {latest_state(name)}")


def cut(name: str, up: bool) -> None:
    """Cut or restore a Pi's cable: its bridge-side end, out of the host's reach."""
    fleet.run(["ip", "link", "set", fleet.host(name).veth, "up" if up else "down"])


def generations(name: str) -> list[str]:
    return on_host(name).check_output("readlink -f /nix/var/nix/profiles/system-*-link").split()


def assert_back_on(name: str, old: str, new: str) -> None:
    assert current(name) == old
    assert profile(name) == old
    assert on_host(name).file("/boot/default-system").content_string.strip() == old
    assert new not in generations(name)  # the new generation was removed


def test_link_cut_during_a_slow_activation_and_restored_in_time_deploys(good):
    wanted = configure("pi4", slowActivation="10")
    with start_deploy("--limit", "pi4") as proc:
        wait_for_state("pi4", "activating", 120)
        cut("pi4", up=False)
        time.sleep(7)
        cut("pi4", up=True)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert current("pi4") == wanted and profile("pi4") == wanted
    assert "pi4: deployed: switch" in out
    assert "confirmed over a new SSH connection" in out


def test_link_that_stays_cut_rolls_the_target_back_and_the_run_says_so(good):
    old = good["pi4"]
    wanted = configure("pi4", slowActivation="4")
    with start_deploy("--limit", "pi4", *FAST) as proc:
        wait_for_state("pi4", "activating", 120)
        cut("pi4", up=False)
        wait_for_state("pi4", "rolled-back", 60)  # the target, on its own, link still cut
        time.sleep(3)
        cut("pi4", up=True)
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out
    assert "lost contact" in out and "reconnected after" in out
    assert "pi4: rolled back: no confirmation within 10s" in out
    assert_back_on("pi4", old, wanted)


def test_config_that_takes_the_network_down_rolls_back_while_the_other_pi_deploys(good, tmp_path):
    old = good["pi4"]
    wanted = {"pi4": configure("pi4", breakNetwork=True), "pi5": configure("pi5")}
    report_file = tmp_path / "summary.json"

    result = deploy(*FAST, env={"NIXPUSH_REPORT_FILE": str(report_file)})

    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: rolled back: no confirmation within 10s" in text
    assert f"pi5: deployed: switch {wanted['pi5']}" in text
    assert current("pi5") == wanted["pi5"]
    assert_back_on("pi4", old, wanted["pi4"])
    pi4 = on_host("pi4")
    down = int(pi4.file("/run/bench-network-broken-at").content_string)
    back = int(pi4.file("/run/bench-network-up-at").content_string)
    print(f"pi4 network down -> back on its old system: {back - down}s")
    assert back - down <= 10 + 10
    report = json.loads(report_file.read_text())
    assert report["hosts"]["pi4"]["status"] == "rolled-back"
    assert report["hosts"]["pi4"]["cause"].startswith("no confirmation within 10s")
    assert report["hosts"]["pi5"]["status"] == "deployed"


def test_failing_activation_rolls_back_at_once(good):
    old = good["pi4"]
    wanted = configure("pi4", failActivation=True)
    result = deploy("--limit", "pi4")
    assert result.returncode == 1, output(result)
    # Activated as `test` (what boots changes only once confirmed): `test` is what failed.
    assert "pi4: rolled back: switch-to-configuration test exited 4" in output(result)
    assert "activate: activation script failed: bench-app.service did not start" in output(result)
    assert_back_on("pi4", old, wanted)


def test_a_failing_dry_activation_starts_nothing(good):
    # Dry-activate and the launch are one round trip: the launch must not happen.
    old, runs_before = good["pi4"], run_dirs("pi4")
    wanted = configure("pi4", failDryActivation=True)
    result = deploy("--limit", "pi4")
    text = output(result)
    assert result.returncode == 1, text
    assert f"pi4: failed: dry-activate of {wanted} failed: " in text, text
    assert "cannot read the units of" in text
    assert "activating detached" not in text
    assert run_dirs("pi4") == runs_before  # no activation was started
    assert current("pi4") == old and profile("pi4") == old
    assert wanted not in generations("pi4")


def test_failing_health_check_rolls_back_without_waiting(good, tmp_path):
    old = good["pi4"]
    inventory = tmp_path / "with_checks.py"
    inventory.write_text(
        "from tests.bench.inventory import _data, _fleet, common, main, minimal, network, server\n"
        "_CHECKS = [{'name': 'bench-app', 'command': 'test -e /run/bench-app-healthy',\n"
        "            'timeout': 5, 'retries': 1}]\n"
        "def _with(members):\n"
        "    return [(n, {**d, 'health_checks': _CHECKS}) if n == 'pi4' else (n, d)\n"
        "            for n, d in members]\n"
        "minimal, common, network = _with(minimal), _with(common), _with(network)\n"
    )
    wanted = configure("pi4")
    started = time.monotonic()
    result = deploy("--limit", "pi4", inventory=str(inventory))
    took = time.monotonic() - started
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: rolled back: health check 'bench-app' failed after 2 attempts" in text
    assert "health check sshd: units sshd.service active: skipped" in text  # minimal root's
    assert_back_on("pi4", old, wanted)
    assert took < 30 + 20  # rejected at once, not after the 30 s confirm_timeout... plus the run


def test_sshd_refusing_new_logins_rolls_back(good):
    old = good["pi4"]
    wanted = configure("pi4", breakSsh=True)
    result = deploy("--limit", "pi4", *FAST)
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: rolled back: a new SSH login to confirm failed" in text
    assert "the login was refused: Authentication error" in text
    assert_back_on("pi4", old, wanted)


def test_without_rollback_a_failing_activation_stays_and_fails(good):
    wanted = configure("pi4", failActivation=True)
    result = deploy("--limit", "pi4", "--data", "rollback=false")
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: failed: switch-to-configuration switch exited 4 (rollback is off" in text
    assert current("pi4") == wanted and profile("pi4") == wanted


def test_deploy_action_rollback_returns_to_the_previous_generation(good):
    old = good["pi4"]
    new = configure("pi4")
    assert deploy("--limit", "pi4").returncode == 0
    assert current("pi4") == new

    result = deploy("--limit", "pi4", "--data", "deploy_action=rollback")

    assert result.returncode == 0, output(result)
    assert f"pi4: deployed: rollback {old}" in output(result)
    assert current("pi4") == old and profile("pi4") == old
    assert new in generations("pi4")  # like nixos-rebuild --rollback: nothing is deleted


def test_controller_killed_during_activation_the_target_rolls_back_alone(good):
    old = good["pi4"]
    wanted = configure("pi4", slowActivation="5")
    with start_deploy("--limit", "pi4", *FAST) as proc:
        wait_for_state("pi4", "activating", 120)
        proc.kill()  # SIGKILL
        proc.communicate(timeout=30)
    took = wait_for_state("pi4", "rolled-back", 5 + 10 + 30)
    print(f"controller killed -> pi4 back on its old system after {took:.1f}s")
    assert_back_on("pi4", old, wanted)


def test_no_change_run_arms_nothing_and_dry_run_says_what_would_be_armed(good):
    before = run_dirs("pi4")
    again = deploy("--limit", "pi4")
    assert again.returncode == 0, output(again)
    assert "activating detached" not in output(again)
    assert run_dirs("pi4") == before

    configure("pi4")
    dry = pyinfra(BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", env=bench_sops.env())
    text = output(dry)
    assert dry.returncode == 0, text
    assert "[pi4] rollback armed: the target rolls back unless confirmed within 30s" in text
    assert "(activated as test; what it boots changes only once confirmed)" in text
    assert "[pi4] health check sshd: units sshd.service active" in text
    assert run_dirs("pi4") == before


@pytest.fixture
def web_on_pi4() -> Iterator[str]:
    """A tiny HTTP server inside pi4 (its own namespaces), on its loopback only: the URL."""
    server = subprocess.Popen(
        fleet.in_host(fleet.host("pi4"), ["/usr/bin/python3", "-m", "http.server", "18384",
                                          "--bind", "127.0.0.1", "--directory", "/"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield "http://127.0.0.1:18384/"
    finally:
        server.kill()
        server.wait()


def test_url_health_checks_are_fetched_on_the_target(good, web_on_pi4, tmp_path):
    def inventory(url: str) -> str:
        path = tmp_path / f"url_{len(list(tmp_path.iterdir()))}.py"
        path.write_text(
            "from tests.bench.inventory import _data, _fleet, common, main, minimal, network\n"
            "from tests.bench.inventory import server\n"
            f"_CHECKS = [{{'name': 'web', 'url': {url!r}, 'timeout': 3, 'retries': 1}}]\n"
            "def _with(members):\n"
            "    return [(n, {**d, 'health_checks': _CHECKS}) if n == 'pi4' else (n, d)\n"
            "            for n, d in members]\n"
            "minimal, common, network = _with(minimal), _with(common), _with(network)\n"
        )
        return str(path)

    # Served on pi4's own loopback (the controller could not reach it): passes, deployed.
    wanted = configure("pi4")
    result = deploy("--limit", "pi4", inventory=inventory(web_on_pi4))
    assert result.returncode == 0, output(result)
    assert f"health check web: GET {web_on_pi4}: passed" in output(result)
    assert current("pi4") == wanted

    # Nothing listens there: no confirmation, back to the system it ran.
    broken = configure("pi4")
    result = deploy("--limit", "pi4", inventory=inventory("http://127.0.0.1:18385/"))
    assert result.returncode == 1, output(result)
    assert "pi4: rolled back: health check 'web' failed after 2 attempts" in output(result)
    assert_back_on("pi4", wanted, broken)


# A server on pi4's loopback that wants Basic auth (the credentials on its stdin, so no command
# line of its own shows them) and, while it holds each request (the check's curl waits for
# the answer), prints pi4's process table as JSON, then `auth=ok` or `auth=bad`.
AUTH_SERVER = r"""
import base64, http.server, json, os, pathlib, sys
print(os.getpid(), flush=True)  # its pid inside pi4: nsenter's end does not end it
want = "Basic " + base64.b64encode(sys.stdin.readline().rstrip("\n").encode()).decode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        table = []
        for path in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
            try:
                table.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
        print(json.dumps(table), flush=True)
        ok = self.headers.get("Authorization") == want
        print("auth=ok" if ok else "auth=bad", flush=True)
        self.send_response(200 if ok else 401)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_url_credentials_reach_curl_on_stdin_never_a_command_line(good, tmp_path):
    user, password = "monitor", "s3cret pw'\"x"
    server = subprocess.Popen(
        fleet.in_host(fleet.host("pi4"), ["/usr/bin/python3", "-c", AUTH_SERVER, "18386"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(f"{user}:{password}\n")
    server.stdin.close()
    inner = server.stdout.readline().strip()
    try:
        url = f"http://{user}:{quote(password, safe='')}@127.0.0.1:18386/health"
        check = {"name": "web", "url": url, "timeout": 5, "retries": 1}
        wanted = configure("pi4")
        result = deploy("--limit", "pi4", inventory=inventory_with_checks(tmp_path, [check]))
    finally:
        in_pi("pi4", f"kill {inner}")
        answers = server.stdout.read()
        server.wait()
    text = output(result)
    assert result.returncode == 0, text
    assert "health check web: GET http://***@127.0.0.1:18386/health: passed" in text
    assert current("pi4") == wanted
    lines = answers.splitlines()
    assert "auth=ok" in lines and "auth=bad" not in lines, answers
    tables = [json.loads(line) for line in lines if line.startswith("[")]
    # The table was read while the check's curl ran (under sudo: sudo's own command line, the
    # one it logs as COMMAND=, is in it too).
    assert any("curl" in command and "-K -" in command for command in tables[0]), tables[0]
    assert any("sudo" in command and "nixpush-health" in command for command in tables[0])
    for secret in (password, quote(password, safe=""), user):
        assert not [c for table in tables for c in table if secret in c], secret
    assert password not in text and quote(password, safe="") not in text


# -- one activation per host, reboots, GC, slow checks ---------------------------


def inventory_with_checks(
    tmp_path: Path, checks: list[dict[str, object]], name: str = "pi4"
) -> str:
    """The bench inventory with ``checks`` added to ``name``'s health_checks."""
    path = tmp_path / f"checks_{next(_count)}.py"
    path.write_text(
        "from tests.bench.inventory import _data, _fleet, common, main, minimal, network, server\n"
        f"_CHECKS = {checks!r}\n"
        "def _with(members):\n"
        "    return [(n, {**d, 'health_checks': [*d.get('health_checks', []), *_CHECKS]})\n"
        f"            if n == {name!r} else (n, d) for n, d in members]\n"
        "minimal, common, network = _with(minimal), _with(common), _with(network)\n"
    )
    return str(path)


def start_deploy_with(*args: str, inventory: str = BENCH_INVENTORY) -> subprocess.Popen[str]:
    exe = str(Path(sys.executable).with_name("pyinfra"))
    return subprocess.Popen(
        [exe, "-y", inventory, PI, *args],
        cwd=fleet.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, env=bench_sops.env(),
    )  # fmt: skip


def in_pi(name: str, script: str) -> str:
    """``script`` run by sh inside the host (its namespaces, as root): its stdout."""
    result = fleet.run(fleet.in_host(fleet.host(name), ["sh", "-c", script]), check=False)
    return result.stdout


def latest_run(name: str) -> str:
    return in_pi(name, "ls -1d /run/nixpush/*/ 2>/dev/null | tail -n 1").strip().rstrip("/")


def boot_default(name: str) -> str:
    return on_host(name).file("/boot/default-system").content_string.strip()


# A check that keeps the run in its confirmation window for a while (8 s at worst: fits in 10).
SLOW_CHECK = {"name": "slow", "command": "sleep 6", "timeout": 8, "retries": 0}


def test_two_controllers_at_once_the_second_waits_for_the_first(good):
    first_wanted = configure("pi4", slowActivation="4")
    with start_deploy("--limit", "pi4") as first:
        wait_for_state("pi4", "activating", 120)
        first_run = latest_run("pi4")
        second_wanted = configure("pi4")  # the second controller deploys a newer system
        with start_deploy("--limit", "pi4") as second:
            first_out, _ = first.communicate(timeout=240)
            second_out, _ = second.communicate(timeout=240)
    assert first.returncode == 0, first_out
    assert f"pi4: deployed: switch {first_wanted}" in first_out
    assert second.returncode == 0, second_out
    assert "is pending there (this run's activation waits for it to end)" in second_out
    assert f"activation {first_run.rsplit('/', 1)[-1]}, started " in second_out
    assert f"pi4: deployed: switch {second_wanted}" in second_out
    # Neither undid the other: the host is on the second's system, for good.
    assert current("pi4") == second_wanted and profile("pi4") == second_wanted
    assert boot_default("pi4") == second_wanted
    assert in_pi("pi4", "cat /run/nixpush/lock") == ""  # nobody holds it


def test_a_second_controller_gives_up_naming_the_pending_run(good):
    wanted = configure("pi4", slowActivation="50")
    with start_deploy("--limit", "pi4", "--data", "confirm_timeout=10") as first:
        wait_for_state("pi4", "activating", 120)
        first_run = latest_run("pi4").rsplit("/", 1)[-1]
        # Its own timers make it wait 10 + 10 s for the lock.
        second = deploy("--limit", "pi4", "--data", "confirm_timeout=10",
                        "--data", "activation_timeout=10")  # fmt: skip
        first_out, _ = first.communicate(timeout=240)
    text = output(second)
    assert second.returncode == 1, text
    assert (
        f"pi4: failed: another activation is pending on the target (activation {first_run}, "
        "started "
    ) in text, text
    assert "waited 20s for it to end" in text and "Run again once it has ended" in text
    assert first.returncode == 0, first_out
    assert current("pi4") == wanted and profile("pi4") == wanted


def test_ctrl_c_in_the_confirmation_window_then_run_again_ends_on_the_new_system(good, tmp_path):
    old = good["pi4"]
    inventory = inventory_with_checks(tmp_path, [SLOW_CHECK])
    wanted = configure("pi4")
    args = ("--limit", "pi4", "--data", "confirm_timeout=20")
    with start_deploy_with(*args, inventory=inventory) as first:
        wait_for_state("pi4", "awaiting-confirmation", 120)
        run = latest_run("pi4")
        # The run's systems are GC roots while it is pending.
        roots = in_pi("pi4", f"ls /nix/var/nix/gcroots/nixpush-{run.rsplit('/', 1)[-1]}")
        assert roots.split() == ["new", "previous", "previous-profile"]
        assert current("pi4") == wanted and profile("pi4") == old  # activated as test
        first.send_signal(signal.SIGINT)  # Ctrl-C
        first.communicate(timeout=60)
    # The run left behind is pending: not up to date, and --dry says so.
    dry = pyinfra(inventory, PI, *args, "--dry", env=bench_sops.env())
    assert dry.returncode == 0, output(dry)
    assert f"[pi4] not up to date: activation {run.rsplit('/', 1)[-1]}, started " in output(dry)
    again = deploy(*args, inventory=inventory)
    text = output(again)
    assert again.returncode == 0, text
    assert "is pending there" in text
    assert f"pi4: deployed: switch {wanted}" in text
    time.sleep(22)  # past the first run's window: it rolled back before, not after
    assert current("pi4") == wanted and profile("pi4") == wanted
    assert boot_default("pi4") == wanted
    assert (
        in_pi("pi4", "ls /nix/var/nix/gcroots | grep -v nixpush-copied | grep -c nixpush-").strip()
        == "0"
    )


def test_a_restart_in_the_window_comes_back_on_the_old_system_and_says_so(good, tmp_path):
    old = good["pi4"]
    inventory = inventory_with_checks(tmp_path, [SLOW_CHECK])
    wanted = configure("pi4")
    with start_deploy_with(
        "--limit", "pi4", "--data", "confirm_timeout=10", inventory=inventory
    ) as proc:
        wait_for_state("pi4", "awaiting-confirmation", 120)
        run = latest_run("pi4")
        # The bench's stand-in for a power cut and a reboot: the program dies, /run is emptied
        # (sshd's privilege separation directory made again), and the boot comes up on the
        # boot default, as NixOS's stage 2 links /run/current-system.
        in_pi(
            "pi4",
            f'kill -9 "$(cat {run}/pid)"; '
            "find /run -mindepth 1 -maxdepth 1 ! -name sshd -exec rm -rf {} +; "
            'ln -sfn "$(cat /boot/default-system)" /run/current-system',
        )
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert f"pi4: rolled back: restarted before confirmation: still on {old}" in out, out
    assert "pi4: deployed" not in out
    assert current("pi4") == old and profile("pi4") == old and boot_default("pi4") == old
    assert wanted not in generations("pi4")


def test_health_checks_that_may_outlast_the_window_are_refused_before_anything_runs(good, tmp_path):
    before = run_dirs("pi4")
    slow = {"name": "web", "command": "true", "timeout": 12, "retries": 2}
    configure("pi4")
    result = deploy("--limit", "pi4", inventory=inventory_with_checks(tmp_path, [slow]))
    text = output(result)
    assert result.returncode != 0, text
    assert (
        "pi4: health_checks take up to 40s (web 40s; each (retries + 1) x timeout + retries x "
        "2s), longer than confirm_timeout (30s): set confirm_timeout to 40 or more, or lower "
        "the checks' timeout or retries"
    ) in text
    assert run_dirs("pi4") == before and current("pi4") == good["pi4"]
