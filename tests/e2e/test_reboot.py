"""
Reboots on the bench: whether a new system needs one (its kernel, initrd, modules or kernel
parameters differ from the booted system's), said in the plan, ``--dry``, the summary and the
report; and the reboot after a confirmed switch (``reboot`` data) with each of its outcomes:
deployed (back on the new system, healthy), rolled back (systemd-boot's one-shot entry did not
boot: the previous system did) and failed (extlinux: a system that does not boot leaves the host
down). The bench's reboot is a stand-in (tests/bench/standins/reboot.sh) inside the host's
namespaces, which lack CAP_SYS_BOOT: nothing here can reboot the machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, pyinfra, ssh
from tests.e2e.test_pi import current, output, profile
from tests.e2e.test_safe import FAST, PI, configure, deploy


def reboot(name: str) -> None:
    """Reboot the host with the stand-in, over ssh as root, as nixpush's reboot_command runs
    (the bench's own nsenter keeps CAP_SYS_BOOT: the stand-in refuses to run from there)."""
    h = fleet.host(name)
    before = fleet.init_pid(h)
    ssh(name, f"sudo {fleet.REBOOT_STAND_IN}")
    fleet.wait_until_up(h, other_than=before)


def booted(name: str) -> str:
    h = fleet.host(name)
    return fleet.run(fleet.in_host(h, ["readlink", "-f", "/run/booted-system"])).stdout.strip()


def kernel_of(name: str, system: str) -> str:
    h = fleet.host(name)
    return fleet.run(fleet.in_host(h, ["readlink", "-f", f"{system}/kernel"])).stdout.strip()


def test_a_new_kernel_needs_a_reboot_said_in_the_plan_dry_summary_and_report(push_ready, tmp_path):
    first = configure("pi4", kernel="1")
    result = deploy("--limit", "pi4", *FAST)
    assert result.returncode == 0, output(result)
    reboot("pi4")
    assert booted("pi4") == first == current("pi4")

    # Same kernel, new userspace: no reboot needed.
    same_kernel = configure("pi4", kernel="1")
    result = deploy("--limit", "pi4", *FAST)
    text = output(result)
    assert result.returncode == 0, text
    assert f"pi4: deployed: switch {same_kernel}\n" in text, text
    assert "reboot needed" not in text

    # A new kernel: the plan says so before anything runs, the summary after.
    new_kernel = configure("pi4", kernel="2")
    result = deploy("--limit", "pi4", *FAST, env={"NIXPUSH_REPORT_FILE": str(tmp_path / "r")})
    text = output(result)
    assert result.returncode == 0, text
    old_k, new_k = kernel_of("pi4", first), kernel_of("pi4", new_kernel)
    assert old_k != new_k
    change = f"reboot needed: kernel {old_k} → {new_k}, initrd "
    assert f"pi4: deployed: switch {new_kernel}; {change}" in text, text
    assert "[pi4] " + change in text  # said after the build (not built when --dry ran)
    report = json.loads((tmp_path / "r").read_text())["hosts"]["pi4"]
    assert report["reboot_required"] is True
    assert report["reboot_changes"][0] == f"kernel {old_k} → {new_k}"

    # Up to date, still on the old kernel: --dry (what `nixpush-run check` runs) says so.
    dry = pyinfra(BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", env=bench_sops.env())
    assert dry.returncode == 0, output(dry)
    (line,) = [line for line in output(dry).splitlines() if "pi4: unchanged: " in line]
    assert f"; {change}" in line, output(dry)
    assert f"[pi4] {change}" in output(dry)

    # After a reboot onto it, nothing more is needed.
    reboot("pi4")
    assert booted("pi4") == new_kernel
    dry = pyinfra(BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", env=bench_sops.env())
    assert "reboot needed" not in output(dry), output(dry)


def rebooting(policy: str = "always", timeout: int = 60) -> tuple[str, ...]:
    return (*FAST, "--data", f"reboot={policy}", "--data", f"reboot_timeout={timeout}")


def boot_file(name: str, path: str) -> str | None:
    """A file of the host's /boot (the bench's EFI variables are files there), else None."""
    f = fleet.host(name).dir / "boot" / path
    return f.read_text().strip() if f.exists() else None


@pytest.fixture
def extlinux_pi4(push_ready: None) -> Iterator[str]:
    """pi4 booted on a good system of its own kernel, with no systemd-boot (extlinux, as the
    Pis); up and on a good system again afterwards, whatever the test did to it."""
    h = fleet.host("pi4")
    good = configure("pi4", kernel="1")
    result = deploy("--limit", "pi4", *FAST)
    assert result.returncode == 0, output(result)
    reboot("pi4")
    assert booted("pi4") == good
    yield good
    bring_back(h, good)
    configure("pi4", kernel="1")
    assert deploy("--limit", "pi4", *FAST).returncode == 0


def bring_back(h: fleet.BenchHost, good: str) -> None:
    """A host left down by a system that does not boot up again on ``good``, as its owner
    would pick it at the boot menu."""
    if fleet.is_down(h):
        (h.dir / "boot" / "default-system").write_text(good + "\n")
        fleet.up()
        fleet.wait_until_up(h)


def test_a_reboot_after_the_switch_comes_back_on_the_new_system_and_only_when_needed(
    extlinux_pi4, tmp_path
):
    h = fleet.host("pi4")
    # when-needed, same kernel: no reboot (the host's init is the same).
    before = fleet.init_pid(h)
    same_kernel = configure("pi4", kernel="1")
    result = deploy("--limit", "pi4", *rebooting("when-needed"))
    text = output(result)
    assert result.returncode == 0, text
    assert f"pi4: deployed: switch {same_kernel}\n" in text, text
    assert fleet.init_pid(h) == before
    assert booted("pi4") == extlinux_pi4

    # A new kernel: --dry says it would reboot, the run reboots into it and checks it.
    new_kernel = configure("pi4", kernel="4")
    dry = pyinfra(
        BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", *rebooting("when-needed"),
        env=bench_sops.env(),
    )  # fmt: skip
    assert "[pi4] reboot: if the new system's boot files differ" in output(dry), output(dry)
    result = deploy(
        "--limit",
        "pi4",
        *rebooting("when-needed"),
        env={"NIXPUSH_REPORT_FILE": str(tmp_path / "r")},
    )
    text = output(result)
    assert result.returncode == 0, text
    assert f"pi4: deployed: switch {new_kernel}; rebooted into it\n" in text, text
    assert "rebooting into the boot default (no one-shot entry here)" in text
    assert f"came back on {new_kernel}" in text
    assert fleet.init_pid(h) != before
    assert booted("pi4") == new_kernel == current("pi4") == profile("pi4")
    report = json.loads((tmp_path / "r").read_text())["hosts"]["pi4"]
    assert report["status"] == "deployed" and report["rebooted"] is True
    assert report["reboot_required"] is False

    # Up to date: nothing reboots again.
    after = fleet.init_pid(h)
    result = deploy("--limit", "pi4", *rebooting("always"))
    assert result.returncode == 0, output(result)
    assert fleet.init_pid(h) == after


def test_extlinux_a_system_that_does_not_boot_fails_as_did_not_come_back(extlinux_pi4):
    h = fleet.host("pi4")
    broken = configure("pi4", kernel="5", failBoot=True)
    dry = pyinfra(
        BENCH_INVENTORY, PI, "--limit", "pi4", "--dry", *rebooting("always", 15),
        env=bench_sops.env(),
    )  # fmt: skip
    assert "(extlinux) a new system that does not boot leaves the host down" in output(dry)
    result = deploy("--limit", "pi4", *rebooting("always", 15))
    text = output(result)
    assert result.returncode != 0, text
    assert (
        "pi4: failed: did not come back after reboot (no SSH login within reboot_timeout=15s); "
        f"its boot default is {broken}"
    ) in text, text
    assert fleet.is_down(h)
    assert boot_file("pi4", "default-system") == broken


@pytest.fixture
def systemd_boot_pi5(push_ready: None) -> Iterator[str]:
    """pi5 on a good systemd-boot system, booted into it by nixpush's one-shot reboot (proving
    the healthy path); its boot loader back to extlinux afterwards."""
    h = fleet.host("pi5")
    # Entries for a previous system first (what a one-shot falls back to).
    previous = configure("pi5", systemdBoot=True)
    try:
        result = deploy("--limit", "pi5", *FAST)
        assert result.returncode == 0, output(result)
        good = configure("pi5", systemdBoot=True)
        result = deploy("--limit", "pi5", *rebooting("always"))
        text = output(result)
        assert result.returncode == 0, text
        assert f"pi5: deployed: switch {good}; rebooted into it\n" in text, text
        assert "boots once, nixos-generation-" in text, text
        yield good
    finally:
        shutil.rmtree(h.dir / "boot" / "loader", ignore_errors=True)  # back to extlinux
        bring_back(h, previous)
        configure("pi5")
        assert deploy("--limit", "pi5", *FAST).returncode == 0


def test_systemd_boot_a_healthy_new_system_becomes_the_default(systemd_boot_pi5):
    good = systemd_boot_pi5
    assert booted("pi5") == good == current("pi5") == profile("pi5")
    # The one-shot entry was used and the EFI default dropped: loader.conf's (the new one's).
    assert boot_file("pi5", "loader/oneshot") is None
    assert boot_file("pi5", "loader/efi-default") is None
    entry = (boot_file("pi5", "loader/loader.conf") or "").removeprefix("default ")
    assert f"init={good}/init" in (boot_file("pi5", f"loader/entries/{entry}") or "")


def test_systemd_boot_a_system_that_does_not_boot_rolls_back_to_the_previous(
    systemd_boot_pi5, tmp_path
):
    good = systemd_boot_pi5
    broken = configure("pi5", systemdBoot=True, failBoot=True)
    result = deploy(
        "--limit", "pi5", *rebooting("always"), env={"NIXPUSH_REPORT_FILE": str(tmp_path / "r")}
    )
    text = output(result)
    assert result.returncode != 0, text
    assert "pi5: rolled back: booted the previous system" in text, text
    assert f"came back on the previous system {good}: rolling the profile back" in text
    assert booted("pi5") == good == current("pi5") == profile("pi5")
    assert broken != good
    # What boots next is the previous system: loader.conf's default, no EFI override left.
    assert boot_file("pi5", "loader/efi-default") is None
    entry = (boot_file("pi5", "loader/loader.conf") or "").removeprefix("default ")
    assert f"init={good}/init" in (boot_file("pi5", f"loader/entries/{entry}") or "")
    report = json.loads((tmp_path / "r").read_text())["hosts"]["pi5"]
    assert report["status"] == "rolled-back"
    assert report["cause"] == "booted the previous system"
