"""
Space before copy on the bench: a Pi whose store's filesystem is too small for the new closure
is refused before the copy, with the numbers, and nothing on it changes; the others deploy.

The small filesystem is real: a tmpfs holding a copy of the Pi's store, mounted over its
/nix/store inside the Pi's own mount namespace (nixpush is not told anything).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.bench import fleet
from tests.bench.client import prepare_push, ssh
from tests.e2e.test_pi import current, deploy, desired_path, new_versions, output, profile

SMALL_STORE = "/run/nixpush-small-store"


@pytest.fixture(scope="module")
def push_ready(bench: None) -> None:
    prepare_push()


def in_namespace(h: fleet.BenchHost, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root in the bench host's mount namespace (not over SSH: as its
    machine's owner would, at the console)."""
    pid = fleet.init_pid(h)
    assert pid is not None, f"{h.name} is not running"
    return fleet.run(["nsenter", "-t", str(pid), "-m", "-p", "--", "sh", "-c", script])


@contextlib.contextmanager
def small_store(pi5: fleet.BenchHost) -> Iterator[None]:
    """The Pi's /nix/store on a tmpfs with 2 MiB to spare, while the block runs (its store
    is as it was afterwards: only what the block added to the copy is lost)."""
    try:
        # Copied onto a roomy tmpfs, which then shrinks to what the copy uses plus 2 MiB.
        in_namespace(
            pi5,
            f"mkdir -p {SMALL_STORE} && mount -t tmpfs -o size=1g,mode=1775 nixpush-small "
            f"{SMALL_STORE} && cp -a /nix/store/. {SMALL_STORE}/ && "
            f"chown --reference=/nix/store {SMALL_STORE} && "
            f"used=$(df -Pk {SMALL_STORE} | tail -n 1 | awk '{{print $3}}') && "
            f"mount -o remount,size=$((used + 2048))k {SMALL_STORE} && "
            f"mount --bind {SMALL_STORE} /nix/store",
        )
        yield
    finally:
        in_namespace(
            pi5,
            f"if grep -q ' /nix/store ' /proc/self/mountinfo; then umount /nix/store; fi; "
            f"if [ -d {SMALL_STORE} ]; then umount {SMALL_STORE}; rmdir {SMALL_STORE}; fi",
        )


def test_a_pi_without_room_for_the_copy_is_refused_before_it_and_the_others_deploy(push_ready):
    # Both Pis on a system first, then a new one 4 MiB bigger (padding) for each.
    new_versions("pi4", "pi5")
    first = deploy("--limit", "pi4", "--limit", "pi5")
    assert first.returncode == 0, output(first)
    before = {"current": current("pi5"), "profile": profile("pi5")}
    new_versions("pi4", "pi5", padding=True)
    wanted = {name: desired_path(name) for name in ("pi4", "pi5")}
    with small_store(fleet.host("pi5")):
        store_before = ssh("pi5", "ls /nix/store").stdout
        boot_before = ssh("pi5", "sudo ls -lR /boot").stdout
        free = ssh("pi5", "df -Pk /nix/store | tail -n 1").stdout.split()[3]
        assert int(free) < 4096, f"the small store has {free} KiB free"
        result = deploy("--limit", "pi4", "--limit", "pi5", "--data", "min_free_space=1M")
        text = output(result)
        store_after = ssh("pi5", "ls /nix/store").stdout
    assert result.returncode != 0, text

    # Refused with the numbers and the fix, before the copy.
    refusal = re.search(
        r"pi5: /nix/store has [\d.]+ [KM]iB free, the copy needs 4\.\d MiB more and "
        r"min_free_space keeps 1\.0 MiB \(1M\) free: free [\d.]+ [KM]iB on pi5 "
        r"\(`nix-collect-garbage -d`, or set keep_generations and gc_after_deploy\) or lower "
        r"min_free_space",
        text,
    )
    assert refusal, text
    assert not re.search(r"\[pi5\].*copied", text), text
    # Nothing changed on pi5: its links, its store, its boot directory.
    assert {"current": current("pi5"), "profile": profile("pi5")} == before
    assert store_after == store_before
    assert ssh("pi5", "sudo ls -lR /boot").stdout == boot_before
    # The other Pi deployed, its new kernel and initrd installed where NixOS's extlinux puts them.
    assert current("pi4") == profile("pi4") == wanted["pi4"]
    # Named as extlinux names them: the kernel package's store path, slashes as dashes.
    files = ssh("pi4", f"readlink -f {wanted['pi4']}/kernel {wanted['pi4']}/initrd").stdout.split()
    names = " ".join(
        "/boot/nixos/" + f.removeprefix("/nix/store/").replace("/", "-") for f in files
    )
    assert len(files) == 2 and ssh("pi4", f"sudo ls {names}").returncode == 0


def test_a_pi_with_room_deploys_once_space_is_freed(push_ready):
    # The same new system deploys once the store's filesystem has room (the fixture is gone).
    result = deploy("--limit", "pi5")
    assert result.returncode == 0, output(result)
    assert current("pi5") == desired_path("pi5")


SMALL_BOOT = "/run/nixpush-small-boot"


@contextlib.contextmanager
def small_boot(pi: fleet.BenchHost, spare_kib: int) -> Iterator[None]:
    """The Pi's /boot on a tmpfs with ``spare_kib`` KiB to spare, while the block runs (its
    own /boot, with what the block wrote there, is back afterwards)."""
    try:
        in_namespace(
            pi,
            f"mkdir -p {SMALL_BOOT} && mount -t tmpfs -o size=64m,mode=0755 nixpush-small-boot "
            f"{SMALL_BOOT} && cp -a /boot/. {SMALL_BOOT}/ && "
            f"used=$(df -Pk {SMALL_BOOT} | tail -n 1 | awk '{{print $3}}') && "
            f"mount -o remount,size=$((used + {spare_kib}))k {SMALL_BOOT} && "
            f"mount --bind {SMALL_BOOT} /boot",
        )
        yield
    finally:
        # Only the tmpfs comes off /boot: the host's own /boot is a bind mount under it.
        in_namespace(
            pi,
            f"if grep -q ' /boot .* - tmpfs nixpush-small-boot ' /proc/self/mountinfo; then "
            f"umount /boot; fi; "
            f"if [ -d {SMALL_BOOT} ]; then umount {SMALL_BOOT}; rmdir {SMALL_BOOT}; fi",
        )


def test_a_boot_partition_without_room_for_the_device_trees_is_refused_before_anything(
    push_ready,
):
    """A system with device trees (768 KiB in 48 files) for a Pi whose /boot has 512 KiB free:
    the kernel and initrd alone would fit, the dtbs directory the boot loader copies with them
    does not. Refused before the copy, with the numbers; nothing on the Pi changes."""
    new_versions("pi5")
    assert deploy("--limit", "pi5").returncode == 0
    before = {"current": current("pi5"), "profile": profile("pi5")}
    new_versions("pi5", dtbs=True)
    wanted = desired_path("pi5")
    try:
        with small_boot(fleet.host("pi5"), spare_kib=512):
            free = ssh("pi5", "df -Pk /boot | tail -n 1").stdout.split()[3]
            assert int(free) < 768, f"the small /boot has {free} KiB free"
            store_before = ssh("pi5", "ls /nix/store").stdout
            boot_before = ssh("pi5", "sudo ls -lR /boot").stdout
            result = deploy("--limit", "pi5")
            text = output(result)
            assert ssh("pi5", "sudo ls -lR /boot").stdout == boot_before
            assert ssh("pi5", "ls /nix/store").stdout == store_before
        assert result.returncode != 0, text
        refusal = re.search(
            r"pi5: /boot has [\d.]+ KiB free, the boot loader's new (?:kernel, initrd and )?device "
            r"trees \(dtbs\) need (9\d\d\.\d) KiB and 1\.0 MiB stays free besides: remove old "
            r"generations \(keep_generations\) and their files in /boot/nixos, or set boot_dir "
            r"to where they go",
            text,
        )
        assert refusal, text
        # Every file counted, each up to a whole 4 KiB block: 48 x 16 KiB, and the kernel and
        # initrd (2 small files) unless /boot holds them already (systems share a kernel package).
        needed = float(refusal.group(1))
        assert needed == pytest.approx(48 * 20, abs=0.2) or needed == pytest.approx(968, abs=0.2)
        assert not re.search(r"\[pi5\].*copied", text), text
        assert {"current": current("pi5"), "profile": profile("pi5")} == before

        # With its own /boot back, the same system deploys and its device trees are installed.
        result = deploy("--limit", "pi5")
        assert result.returncode == 0, output(result)
        assert current("pi5") == wanted
        name = wanted.removeprefix("/nix/store/")
        listing = ssh("pi5", f"sudo ls /boot/nixos/{name}-dtbs/broadcom").stdout.split()
        assert len(listing) == 24, listing
    finally:
        new_versions("pi5", dtbs=False)


def generations(host_name: str) -> dict[int, str]:
    """The host's system generations: number -> system."""
    listing = ssh(
        host_name,
        'for l in /nix/var/nix/profiles/system-*-link; do echo "$l $(readlink -f $l)"; done',
    ).stdout
    found = {}
    for line in listing.splitlines():
        link, system = line.split()
        found[int(link.rsplit("/system-", 1)[1].removesuffix("-link"))] = system
    return found


def test_keep_generations_prunes_after_each_switch_keeps_the_booted_one_and_rollback_works(
    push_ready,
):
    new_versions("pi5")
    assert deploy("--limit", "pi5").returncode == 0
    booted = current("pi5")
    # As NixOS's stage 2 links it at boot: the system the Pi booted, kept whatever its age.
    ssh("pi5", f"sudo ln -sfn {booted} /run/booted-system")
    try:
        for _ in range(5):
            new_versions("pi5")
            result = deploy("--limit", "pi5", "--data", "keep_generations=3")
            assert result.returncode == 0, output(result)
        text = output(result)
        assert "keep_generations 3: deleted system generation" in text, text
        kept = generations("pi5")
        numbers = sorted(kept)
        # The newest three, and the booted one (older than those: kept besides).
        assert len(kept) == 4, kept
        assert kept[numbers[0]] == booted
        assert f"kept besides: {numbers[0]} (booted)" in text, text
        assert kept[numbers[-1]] == current("pi5") == profile("pi5")

        # --dry says what the next switch would delete, and nothing goes.
        new_versions("pi5")
        dry = deploy("--limit", "pi5", "--dry", "--data", "keep_generations=3")
        assert dry.returncode == 0, output(dry)
        assert f"keep_generations 3: would delete system generation {numbers[1]}" in output(dry)
        assert generations("pi5") == kept

        # A rollback still goes back to the previous generation.
        back = deploy("--limit", "pi5", "--data", "deploy_action=rollback")
        assert back.returncode == 0, output(back)
        assert current("pi5") == profile("pi5") == kept[numbers[-2]]
    finally:
        ssh("pi5", "sudo rm -f /run/booted-system")
