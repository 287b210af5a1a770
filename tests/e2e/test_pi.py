"""
The main job on the bench: `pyinfra <inventory> deploys/pi.py` builds each Pi's system on the
NAS under emulation, copies it over ssh-ng and activates it; checked on the hosts afterwards.
"""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import (
    BENCH_INVENTORY,
    on_host,
    pyinfra,
    pyinfra_argv,
    ssh,
)

PI = "deploys/pi.py"
_versions = itertools.count(1)


@pytest.fixture
def link_restored() -> Iterator[None]:
    yield
    for h in (*fleet.PIS, fleet.host("nas")):
        fleet.set_link(h, up=True)
        fleet.run(["tc", "qdisc", "del", "dev", h.veth, "root"], check=False)


def new_versions(*names: str, **attrs: str | bool) -> dict[str, str]:
    """Give the named Pis' configurations a version never deployed before; return them."""
    run_id = uuid.uuid4().hex[:6]
    configs = current_configs()
    versions = {}
    for name in names:
        versions[name] = f"{run_id}-{next(_versions)}"
        configs[name] = {**configs[name], "version": versions[name], **attrs}
    fleet.set_flake_configs(configs)
    return versions


def current_configs() -> dict[str, fleet.FlakeConfig]:
    return fleet.flake_configs()


def desired_path(config: str) -> str:
    attr = f"{fleet.flake_ref()}#nixosConfigurations.{config}.config.system.build.toplevel"
    out = ssh("nas", f"nix eval --raw '{attr}.outPath'").stdout.strip()
    assert out.startswith("/nix/store/"), out
    return out


def derivation(config: str) -> str:
    attr = f"{fleet.flake_ref()}#nixosConfigurations.{config}.config.system.build.toplevel"
    out = ssh("nas", f"nix eval --raw '{attr}.drvPath'").stdout.strip()
    assert out.endswith(".drv"), out
    return out


def link(host_name: str, path: str) -> str | None:
    result = ssh(host_name, f"readlink -f {path} 2>/dev/null || true", check=False)
    return result.stdout.strip() or None


def current(host_name: str) -> str | None:
    return link(host_name, "/run/current-system")


def profile(host_name: str) -> str | None:
    return link(host_name, "/nix/var/nix/profiles/system")


def deploy(*args: str) -> subprocess.CompletedProcess[str]:
    """deploys/pi.py as a user runs it, with the sops age key in the environment."""
    return pyinfra("-y", BENCH_INVENTORY, PI, *args, env=bench_sops.env())


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_cold_deploy_of_two_pis_builds_on_the_nas_and_activates_as_aarch64(push_ready):
    new_versions("pi4", "pi5")
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    for path in wanted.values():
        assert ssh("nas", f"nix path-info {path}", check=False).returncode != 0  # really cold

    result = deploy()

    assert result.returncode == 0, output(result)
    nas = on_host("nas")
    for name, path in wanted.items():
        pi = on_host(name)
        assert current(name) == path
        assert profile(name) == path
        assert pi.file("/boot/default-system").content_string.strip() == path
        assert nas.file(f"{path}/build-arch").content_string.strip() == "aarch64"
        assert pi.file("/run/bench-activations").content_string.splitlines()[-1] == (
            f"test {path} aarch64"  # activated as test; made the boot default once confirmed
        )
        # Built on the NAS only: the derivation never reached the Pi's store.
        assert not pi.file(derivation(name)).exists
        assert f"{name}: deployed: switch {path}" in output(result)
    # ... nor the controller's (it may have no Nix store at all).
    assert not any(Path(p).exists() for p in wanted.values())
    assert "dry-activate: would activate the configuration" in output(result)


def test_second_run_changes_nothing_and_copies_nothing(push_ready):
    first = deploy()
    assert first.returncode == 0, output(first)

    again = deploy()

    assert again.returncode == 0, output(again)
    text = output(again)
    for name in ("pi4", "pi5"):
        assert f"{name}: unchanged: {name} already runs {current(name)}" in text
    assert "copied" not in text and "built" not in text
    assert "Grand total" in text and " Success " in text
    totals = next(line for line in text.splitlines() if "Grand total" in line).split()
    assert totals[3:5] == ["-", "-"], totals  # no success, no error: all no-change
    # Targets on their systems get no operations at all (each would be a no-op that costs
    # the controller its bookkeeping): the results list none, only their header.
    results = text.split("--> Results:")[1].split("Grand total")[0]
    rows = [line for line in results.splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0].split()[0] == "Operation", rows


def test_changing_one_pi_rebuilds_and_redeploys_only_that_pi(push_ready):
    assert deploy().returncode == 0
    pi5_before = current("pi5")
    new_versions("pi4")
    pi4_wanted = desired_path("pi4")

    result = deploy()

    assert result.returncode == 0, output(result)
    assert current("pi4") == pi4_wanted
    assert current("pi5") == pi5_before
    text = output(result)
    assert f"[pi4] built {pi4_wanted} on nas" in text
    assert "[pi5] built" not in text and "[pi5] copied" not in text
    assert f"pi5: unchanged: pi5 already runs {pi5_before}" in text


def test_dry_activate_test_and_boot_touch_only_what_nixos_would(push_ready):
    assert deploy("--limit", "pi5").returncode == 0
    before_current, before_profile = current("pi5"), profile("pi5")

    new_versions("pi5")
    wanted = desired_path("pi5")
    dry = deploy("--limit", "pi5", "--data", "deploy_action=dry-activate")
    assert dry.returncode == 0, output(dry)
    assert "dry-activate: would activate the configuration " + wanted in output(dry)
    assert (current("pi5"), profile("pi5")) == (before_current, before_profile)

    tested = deploy("--limit", "pi5", "--data", "deploy_action=test")
    assert tested.returncode == 0, output(tested)
    assert (current("pi5"), profile("pi5")) == (wanted, before_profile)

    new_versions("pi5")
    boot_wanted = desired_path("pi5")
    booted = deploy("--limit", "pi5", "--data", "deploy_action=boot")
    assert booted.returncode == 0, output(booted)
    assert (current("pi5"), profile("pi5")) == (wanted, boot_wanted)
    assert on_host("pi5").file("/boot/default-system").content_string.strip() == boot_wanted


def test_build_action_builds_on_the_nas_and_touches_no_pi(push_ready):
    new_versions("pi4")
    wanted, before = desired_path("pi4"), current("pi4")

    result = deploy("--limit", "pi4", "--data", "deploy_action=build")

    assert result.returncode == 0, output(result)
    assert "Authorize the builder's deploy key" not in output(result)  # pi4 left alone
    assert ssh("nas", f"nix path-info {wanted}", check=False).returncode == 0
    assert current("pi4") == before
    assert not on_host("pi4").file(wanted).exists


def test_build_action_needs_no_target_even_when_its_link_is_down(push_ready, link_restored):
    new_versions("pi4", "pi5")
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    fleet.set_link(fleet.host("pi4"), up=False)

    # The whole fleet, pi4 unreachable: built from the NAS's run.
    result = deploy("--data", "deploy_action=build")
    text = output(result)
    assert result.returncode == 0, text
    assert f"pi4: deployed: build {wanted['pi4']}" in text
    assert f"pi5: deployed: build {wanted['pi5']}" in text
    assert ssh("nas", f"nix path-info {wanted['pi4']}", check=False).returncode == 0
    # Just pi4 (with its builder, which runs the build): nothing left to build.
    result = deploy("--limit", "nas", "--limit", "pi4", "--data", "deploy_action=build")
    assert result.returncode == 0, output(result)
    assert f"pi4: unchanged: nas has already built {wanted['pi4']}" in output(result)
    assert "Traceback" not in text + output(result)


def test_dry_run_changes_nothing_anywhere_and_shows_current_and_desired(push_ready):
    assert deploy().returncode == 0
    before = {name: (current(name), profile(name)) for name in ("pi4", "pi5")}
    new_versions("pi4")
    wanted = desired_path("pi4")

    result = pyinfra(BENCH_INVENTORY, PI, "--dry", env=bench_sops.env())

    assert result.returncode == 0, output(result)
    assert f"[pi4] switch: {before['pi4'][0]} -> {wanted}" in output(result)
    assert ssh("nas", f"nix path-info {wanted}", check=False).returncode != 0  # not built
    assert not on_host("pi4").file(wanted).exists  # not copied
    assert {name: (current(name), profile(name)) for name in ("pi4", "pi5")} == before


def test_pi_with_cut_link_fails_alone_and_a_rerun_converges(push_ready, link_restored):
    assert deploy().returncode == 0
    pi5_old = current("pi5")
    new_versions("pi4", "pi5")
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    fleet.set_link(fleet.host("pi5"), up=False)

    result = deploy()

    assert result.returncode != 0
    assert current("pi4") == wanted["pi4"]
    assert "pi5: failed:" in output(result)
    fleet.set_link(fleet.host("pi5"), up=True)
    assert current("pi5") == pi5_old
    rerun = deploy()
    assert rerun.returncode == 0, output(rerun)
    assert current("pi5") == wanted["pi5"]


def test_link_cut_during_the_copy_fails_that_pi_with_the_cause(push_ready, link_restored):
    assert deploy().returncode == 0
    pi5 = fleet.host("pi5")
    old = current("pi5")
    # A closure big enough, and a link slow enough, to cut in the middle of the copy.
    new_versions("pi4", "pi5", padding=True)
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    fleet.run(
        ["tc", "qdisc", "replace", "dev", pi5.veth, "root", "tbf",
         "rate", "2mbit", "burst", "32kb", "latency", "400ms"]
    )  # fmt: skip
    with subprocess.Popen(
        _pyinfra_argv(),
        cwd=fleet.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        env=bench_sops.env(),
    ) as proc:
        assert _wait_for_copy_to(pi5, timeout=60), "the copy to pi5 never started"
        fleet.set_link(pi5, up=False)
        out, _ = proc.communicate(timeout=120)

    assert proc.returncode != 0, out
    assert current("pi4") == wanted["pi4"]
    assert "pi5: failed:" in out
    fleet.set_link(pi5, up=True)
    fleet.run(["tc", "qdisc", "del", "dev", pi5.veth, "root"], check=False)
    assert current("pi5") == old
    rerun = deploy()
    assert rerun.returncode == 0, output(rerun)
    assert current("pi5") == wanted["pi5"]


def _pyinfra_argv() -> list[str]:
    return pyinfra_argv("-y", BENCH_INVENTORY, PI)


def _wait_for_copy_to(h: fleet.BenchHost, timeout: float) -> bool:
    """Wait until the NAS holds an SSH connection to ``h`` (the ssh-ng copy)."""
    nas = fleet.host("nas")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ss = fleet.run(["ip", "netns", "exec", nas.netns, "ss", "-Htn", "state", "established"])
        if f"{h.ip}:{h.port}" in ss.stdout:
            return True
        time.sleep(0.05)
    return False


def test_untrusted_pi_without_a_signing_key_on_the_nas_fails_clearly(push_ready):
    # pi5's deploy user is not in its Nix daemon's trusted-users: it only takes signed paths.
    assert "trusted-users" not in on_host("pi5").file("/etc/nix/nix.conf").content_string
    before = current("pi5")
    new_versions("pi5")
    key = "/root/.nixpush/signing-key.sec"
    saved = ssh("nas", f"cat {key}").stdout
    ssh("nas", f"rm {key}")
    try:
        result = deploy("--limit", "pi5")
    finally:
        subprocess.run(
            ["ssh", "-F", str(fleet.BENCH_DIR / "ssh_config"), "nas",
             f"umask 077; cat > {key}"],
            input=saved, text=True, check=True,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"builder nas has no Nix signing key at {key}" in output(result)
    assert "deploys/secrets.py" in output(result)
    assert current("pi5") == before


def test_hosts_the_deploy_does_not_act_on_may_be_asleep(push_ready, tmp_path):
    # A laptop in the inventory whose address answers nothing.
    inventory = tmp_path / "fleet_with_laptop.py"
    inventory.write_text(
        "from tests.bench.inventory import _data, _fleet, common, main, minimal, network, server\n"
        "_nas = {k: v for k, v in _data(_fleet.host('nas')).items() if k != 'builder_host'}\n"
        "_laptop = ('laptop', {**_nas, 'ssh_hostname': _fleet.SUBNET + '.99'})\n"
        "minimal = [*minimal, _laptop]\n"
        "work = [_laptop]\n"
    )
    new_versions("pi4")
    wanted = desired_path("pi4")

    result = pyinfra("-y", str(inventory), PI, env=bench_sops.env())

    assert result.returncode == 0, output(result)
    assert current("pi4") == wanted
    assert "laptop: skipped: unreachable, not needed by this deploy" in output(result)


def test_controller_on_the_nas_deploys_the_pis(push_ready):
    """The owner's setup: pyinfra runs on the NAS (its network namespace and address)."""
    new_versions("pi4", "pi5")
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    nas_init = fleet.init_pid(fleet.host("nas"))

    result = subprocess.run(
        ["nsenter", "-t", str(nas_init), "-n", "-u", "--", *_pyinfra_argv()],
        cwd=fleet.REPO, text=True, capture_output=True, timeout=300,
        stdin=subprocess.DEVNULL, env=bench_sops.env(),
    )  # fmt: skip

    assert result.returncode == 0, output(result)
    assert {name: current(name) for name in wanted} == wanted


def test_unknown_host_is_named_and_nothing_runs(push_ready):
    # pyinfra itself answers a --limit that matches no host, before any deploy code runs:
    # it warns and exits 0 (nixpush's scheduled entry point turns this into an error).
    before = {name: current(name) for name in ("pi4", "pi5")}
    result = deploy("--limit", "pi9")
    assert "No host matches found for --limit pattern: pi9" in output(result)
    assert "Connected" not in output(result)
    assert {name: current(name) for name in ("pi4", "pi5")} == before


def test_missing_configuration_in_the_flake_fails_that_pi_before_any_build(push_ready):
    before = current("pi4")
    result = deploy("--limit", "pi4", "--data", "nixos_config=pi404")
    assert result.returncode != 0
    text = output(result)
    assert "cannot evaluate" in text and "nixosConfigurations.pi404" in text
    assert "set nixos_config" in text
    assert "built" not in text and current("pi4") == before


def test_builder_that_cannot_build_the_pis_system_is_refused_before_anything(push_ready):
    result = deploy("--data", "binfmt_emulated_systems=armv7l-linux")
    assert result.returncode != 0
    text = output(result)
    assert "pi4: builder_host 'nas' cannot build nix_system 'aarch64-linux'" in text
    assert "add 'aarch64-linux' to nas's binfmt_emulated_systems" in text
    assert "Beginning operation run" not in text


def test_unreachable_builder_fails_the_pis_with_the_cause(push_ready, link_restored):
    before = {name: current(name) for name in ("pi4", "pi5")}
    new_versions("pi4", "pi5")
    fleet.set_link(fleet.host("nas"), up=False)
    result = deploy()
    fleet.set_link(fleet.host("nas"), up=True)
    assert result.returncode != 0
    text = output(result)
    for name in ("pi4", "pi5"):
        assert f"{name}: failed: builder nas is unreachable" in text
    assert {name: current(name) for name in ("pi4", "pi5")} == before


def test_dry_run_shows_what_changes_when_both_closures_are_on_the_builder(push_ready):
    assert deploy("--limit", "pi4").returncode == 0
    before = current("pi4")
    new_versions("pi4", padding=True)
    wanted = desired_path("pi4")
    assert deploy("--limit", "pi4", "--data", "deploy_action=build").returncode == 0

    result = pyinfra(BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", env=bench_sops.env())

    assert result.returncode == 0, output(result)
    text = output(result)
    assert f"[pi4] switch: {before} -> {wanted}" in text
    # nix store diff-closures, indented under the plan: the padding adds ~4 MiB.
    diff = [line for line in text.splitlines() if line.startswith("    [pi4]   ")]
    assert diff and any("→" in line for line in diff), text
    assert current("pi4") == before


def test_without_the_age_key_the_deploy_stops_before_touching_anything(push_ready):
    before = {name: current(name) for name in ("pi4", "pi5")}
    new_versions("pi4")
    environment = {k: v for k, v in bench_sops.env().items() if k != "SOPS_AGE_KEY_FILE"}

    result = pyinfra("-y", BENCH_INVENTORY, PI, env=environment)

    assert result.returncode != 0
    text = output(result)
    assert "no key can decrypt" in text and "set SOPS_AGE_KEY_FILE" in text
    assert "Beginning operation run" not in text
    assert {name: current(name) for name in ("pi4", "pi5")} == before


@pytest.fixture
def odd_bytes() -> Iterator[None]:
    """No configuration prints odd bytes after the test."""
    yield
    configs = current_configs()
    for attrs in configs.values():
        attrs.pop("oddBytes", None)  # type: ignore[misc]
    fleet.set_flake_configs(configs)


def test_an_activation_printing_bytes_that_are_not_utf8_deploys_and_confirms(push_ready, odd_bytes):
    # Such a line once ended pyinfra's reading of every answer holding it: the launch read as
    # failed, or the follows spun for 41 minutes and the target rolled back. pi4 runs it with
    # setsid (its output file), pis as a systemd unit (the journal).
    sd = next(h.name for h in fleet.PIS if h.systemd)
    new_versions("pi4", sd, oddBytes=True)
    wanted = {name: desired_path(name) for name in ("pi4", sd)}
    started = time.monotonic()
    result = deploy("--limit", "pi4", "--limit", sd)
    text = output(result)
    assert result.returncode == 0, text
    assert time.monotonic() - started < 120, text
    for name, path in wanted.items():
        assert current(name) == path and profile(name) == path
        assert f"{name}: deployed: switch {path}" in text
    assert "dry-activate: dry-activate: caf\ufffd \ufffd\ufffd odd bytes" in text
    assert "activate: test: caf\ufffd \ufffd\ufffd odd bytes" in text
    assert "confirmed over a new SSH connection" in text
