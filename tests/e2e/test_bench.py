"""The bench fleet itself: reachable the way users reach hosts, isolated, and clean to remove."""

from __future__ import annotations

import shlex
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra, ssh


def test_down_leaves_nothing_and_up_again_is_idempotent(bench):
    fleet.down()
    assert fleet.leftovers() == []
    fleet.up()
    fleet.up()  # a second bring-up changes nothing and still leaves every host up
    assert all(state.startswith("up") for state in fleet.status().values())


def test_pyinfra_reaches_every_bench_host_with_strict_host_keys(bench):
    result = pyinfra("-y", BENCH_INVENTORY, "exec", "--", "hostname")
    assert result.returncode == 0, result.stderr + result.stdout
    for h in fleet.HOSTS:
        assert f"[{h.name}] {h.name}" in result.stdout + result.stderr


def test_pyinfra_refuses_a_host_whose_key_does_not_match(bench, tmp_path):
    wrong = tmp_path / "known_hosts"
    pi4, nas = fleet.host("pi4"), fleet.host("nas")
    nas_key = (nas.dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    wrong.write_text(f"{pi4.known_hosts_name} {' '.join(nas_key)}\n")
    result = pyinfra(
        "-y", BENCH_INVENTORY, "--limit", "pi4",
        "--data", f"ssh_known_hosts_file={wrong}",
        "exec", "--", "hostname",
    )  # fmt: skip
    assert result.returncode != 0
    assert "[pi4] pi4" not in result.stdout


def test_pi_runs_an_aarch64_program_from_its_own_store_under_emulation(bench):
    # The directory, not the file: Debian's busybox runs only when called "busybox".
    busybox_dir = fleet.BENCH_DIR / "busybox" / "aarch64-linux"
    added = ssh("pi4", f"sudo nix-store --add {shlex.quote(str(busybox_dir))}").stdout.strip()
    assert added.startswith("/nix/store/")
    pi4 = on_host("pi4")
    assert pi4.run(f"{added}/busybox uname -m").stdout.strip() == "aarch64"
    assert pi4.run("uname -m").stdout.strip() == "x86_64"  # the kernel is the machine's
    for other in ("nas", "pi5"):
        assert not on_host(other).file(added).exists, f"{added} leaked into {other}"


def test_each_host_has_its_own_users_nix_config_and_identity(bench):
    pi4, pi5, nas = (on_host(n) for n in ("pi4", "pi5", "nas"))
    assert pi4.user("beau").exists and not pi5.user("beau").exists
    assert pi5.user("ops").exists
    assert pi4.file("/etc/sudoers.d/beau").mode == 0o440
    assert pi4.check_output("hostname") == "pi4"
    assert "system = aarch64-linux" in pi4.file("/etc/nix/nix.conf").content_string
    assert "system = x86_64-linux" in nas.file("/etc/nix/nix.conf").content_string
    assert nas.socket(f"tcp://{fleet.host('nas').ip}:22").is_listening
    assert pi4.socket(f"tcp://{fleet.host('pi4').ip}:8023").is_listening


def open_sessions(h: fleet.BenchHost, count: int) -> list[str]:
    """Open ``count`` sessions at once on ONE SSH connection to ``h``; what each got."""
    import paramiko  # pyinfra's SSH library; only this test needs it directly

    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.BENCH_DIR / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        h.ip, port=h.port, username=h.user, key_filename=str(fleet.BENCH_DIR / "id_ed25519"),
        look_for_keys=False, allow_agent=False, timeout=10,
    )  # fmt: skip
    results = []
    try:
        transport = client.get_transport()
        assert transport is not None
        for _ in range(count):
            try:
                channel = transport.open_session(timeout=10)
            except paramiko.ChannelException as error:
                results.append(f"refused: {error.code} {error.text}")
                continue
            channel.exec_command("sleep 30")  # stays open while the next ones are opened
            results.append("open")
    finally:
        client.close()
    return results


@pytest.fixture
def nas_max_sessions_restored() -> Iterator[None]:
    nas = fleet.host(fleet.BUILDER)
    before = fleet.sshd_options(nas)["MaxSessions"]
    yield
    fleet.set_sshd_option(fleet.BUILDER, "MaxSessions", before)


def test_max_sessions_limits_sessions_per_connection_and_restores(bench, nas_max_sessions_restored):
    nas = fleet.host(fleet.BUILDER)
    pid = fleet.init_pid(nas)
    before = fleet.sshd_options(nas)["MaxSessions"]
    assert int(before) >= 3

    fleet.set_sshd_option(nas, "MaxSessions", "2")

    assert fleet.init_pid(nas) == pid  # sshd re-exec'd itself, still the host's PID 1
    assert "MaxSessions 2\n" in (nas.dir / "ssh" / "sshd_config").read_text()
    assert open_sessions(nas, 3) == ["open", "open", "refused: 2 Connect failed"]

    fleet.set_sshd_option(nas, "MaxSessions", before)

    assert open_sessions(nas, 3) == ["open", "open", "open"]
    assert fleet.sshd_options(fleet.host(fleet.BUILDER))["MaxSessions"] == before


def test_up_with_more_pis_adds_an_armv7l_pi_everywhere_and_back_leaves_nothing(bench):
    default, default_pis = [h.name for h in fleet.HOSTS], len(fleet.PIS)
    try:
        fleet.up(pis=default_pis + 1)  # one more than the default fleet
        extra = fleet.host("pi6")
        assert sorted(h.name for h in fleet.HOSTS) == sorted([*default, "pi6"])
        assert extra.system == "armv7l-linux" and extra.user != "root"
        assert fleet.status()["pi6"].startswith("up")
        # Every process sees the recorded fleet: pyinfra through the bench inventory too.
        result = pyinfra("-y", BENCH_INVENTORY, "exec", "--", "hostname")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "[pi6] pi6" in result.stdout + result.stderr
        assert "pi6" in fleet.flake_configs()
        assert "system = armv7l-linux" in on_host("pi6").file("/etc/nix/nix.conf").content_string
        busybox_dir = fleet.BENCH_DIR / "busybox" / "armv7l-linux"
        added = ssh("pi6", f"sudo nix-store --add {shlex.quote(str(busybox_dir))}").stdout.strip()
        assert on_host("pi6").run(f"{added}/busybox uname -m").stdout.strip() == "armv7l"
    finally:
        fleet.up(pis=default_pis)
    assert [h.name for h in fleet.HOSTS] == default
    assert not any("pi6" in item for item in fleet.leftovers())


# reboot(2) with LINUX_REBOOT_CMD_CAD_OFF (0): harmless wherever it ran (it only says what
# Ctrl-Alt-Del does), EPERM without CAP_SYS_BOOT. glibc's reboot() adds the magic numbers.
CAD_OFF_PROBE = (
    "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    "print(libc.reboot(0), os.strerror(ctypes.get_errno()))"
)
CAP_SYS_BOOT = 22


def test_no_bench_host_can_reach_reboot_or_the_machines_init(bench):
    for h in fleet.HOSTS:
        sudo = "" if h.user == "root" else "sudo "
        probe = ssh(h.name, f"{sudo}python3 -c {shlex.quote(CAD_OFF_PROBE)}").stdout.strip()
        assert probe == "-1 Operation not permitted", (h.name, probe)
        # Nothing of the host has CAP_SYS_BOOT: its init, nor a root shell, nor its launcher.
        launcher = [
            pid
            for pid in fleet._netns_pids(h.netns)
            if b"launch.sh" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(launcher) == 1, h.name
        for status in (
            ssh(h.name, f"{sudo}cat /proc/1/status").stdout,
            ssh(h.name, f"{sudo}cat /proc/self/status").stdout,
            *(Path(f"/proc/{pid}/status").read_text() for pid in launcher),
        ):
            (bounding,) = [line.split()[1] for line in status.splitlines() if "CapBnd" in line]
            assert not int(bounding, 16) >> CAP_SYS_BOOT & 1, (h.name, status)
        # Its PID 1 is its own init, not the machine's.
        assert ssh(h.name, "cat /proc/1/comm").stdout.strip() in ("sshd", "systemd"), h.name


def in_bench_host(name: str, script: str) -> str:
    return fleet.run(fleet.in_host(fleet.host(name), ["sh", "-c", script])).stdout


def fake_system(name: str, *, boots: bool) -> str:
    """A store path standing for a system (what the boot stand-in reads of it), on ``name``."""
    marker = "" if boots else "touch $d/bench-does-not-boot; "
    return in_bench_host(
        name, f"d=$(mktemp -d); touch $d/kernel; {marker}nix-store --add $d; rm -rf $d"
    ).strip()


def reboot(name: str) -> int:
    """The stand-in reboot over ssh, as nixpush runs it; the new init's PID (or 0: down)."""
    h = fleet.host(name)
    before = fleet.init_pid(h)
    sudo = "" if h.user == "root" else "sudo "
    ssh(name, f"{sudo}{fleet.REBOOT_STAND_IN}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if fleet.is_down(h):
            return 0
        pid = fleet.init_pid(h)
        if pid not in (None, before):
            try:  # up, or a boot that fails and leaves it down
                return fleet.wait_until_up(h, timeout=1, other_than=before)
            except RuntimeError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"{name} neither rebooted nor went down")


@pytest.fixture
def boot_restored() -> Iterator[None]:
    yield
    for h in fleet.PIS + fleet.DESKTOPS:
        for leftover in ("default-system", "loader"):
            path = h.dir / "boot" / leftover
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
    fleet.up()


def test_the_reboot_stand_in_boots_the_default_or_a_one_shot_entry_once(bench, boot_restored):
    for name in ("pi4", "pis"):  # sshd as init, and systemd
        good, bad = fake_system(name, boots=True), fake_system(name, boots=False)
        in_bench_host(name, f"echo {good} > /boot/default-system; touch /run/left-behind")
        old_pid = fleet.init_pid(fleet.host(name))
        assert reboot(name) not in (0, old_pid)
        assert in_bench_host(name, "readlink /run/booted-system /run/current-system").split() == [
            good, good,
        ]  # fmt: skip
        assert in_bench_host(name, "ls /run/left-behind 2>&1 || true").count("No such") == 1
        # A default that does not boot: the host stays down, until the default is fixed.
        in_bench_host(name, f"echo {bad} > /boot/default-system")
        assert reboot(name) == 0
        (fleet.host(name).dir / "boot" / "default-system").write_text(good + "\n")
        fleet.up()
    # systemd-boot: a one-shot entry boots once; one that does not boot falls back.
    good, new, bad = (fake_system("pc1", boots=b) for b in (True, True, False))
    entries = "".join(
        f"echo 'options init={system}/init' > /boot/loader/entries/nixos-generation-{g}.conf; "
        for g, system in ((1, good), (2, new), (3, bad))
    )
    in_bench_host(
        "pc1", f"mkdir -p /boot/loader/entries; {entries}"
        "echo 'default nixos-generation-1.conf' > /boot/loader/loader.conf",
    )  # fmt: skip
    ssh("pc1", "sudo bootctl set-oneshot nixos-generation-2.conf")
    reboot("pc1")
    assert in_bench_host("pc1", "readlink /run/booted-system").strip() == new
    reboot("pc1")  # once only
    assert in_bench_host("pc1", "readlink /run/booted-system").strip() == good
    ssh("pc1", "sudo bootctl set-oneshot nixos-generation-3.conf")
    reboot("pc1")
    assert in_bench_host("pc1", "readlink /run/booted-system").strip() == good
    assert (
        "the one-shot entry nixos-generation-3.conf does not boot"
        in (fleet.host("pc1").dir / "init.log").read_text()
    )


def test_a_second_address_answers_when_the_first_is_dropped(bench):
    pi4 = fleet.host("pi4")
    assert pi4.second_ip is not None
    try:
        fleet.drop_address(pi4)
        with pytest.raises(OSError):
            socket.create_connection((pi4.ip, pi4.port), timeout=1).close()
        with socket.create_connection((pi4.second_ip, pi4.port), timeout=2):
            pass
    finally:
        fleet.drop_address(pi4, dropped=False)
    with socket.create_connection((pi4.ip, pi4.port), timeout=2):
        pass
