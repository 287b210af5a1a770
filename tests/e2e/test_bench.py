"""The bench fleet itself: reachable the way users reach hosts, isolated, and clean to remove."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

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
