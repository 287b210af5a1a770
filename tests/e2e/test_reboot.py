"""
Reboots on the bench: whether a new system needs one (its kernel, initrd, modules or kernel
parameters differ from the booted system's), said in the plan, ``--dry``, the summary and the
report. The bench's reboot is a stand-in (tests/bench/standins/reboot.sh) inside the host's
namespaces, which lack CAP_SYS_BOOT: nothing here can reboot the machine.
"""

from __future__ import annotations

import json

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, pyinfra, ssh
from tests.e2e.test_pi import current, output
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
