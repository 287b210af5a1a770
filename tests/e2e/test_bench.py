"""The bench fleet itself: reachable the way users reach hosts, isolated, and clean to remove."""

from __future__ import annotations

import shlex

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
