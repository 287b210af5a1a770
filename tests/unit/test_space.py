"""Space before copy: the margin's grammar, the builder's and the target's answers, the
numbers a refusal gives, and the target's command run for real against this machine's store."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from operations.core.models import Margin
from operations.push.space import (
    BOOT_MARGIN,
    BootFile,
    Closure,
    Filesystem,
    TargetSpace,
    boot_name,
    closure_command,
    human,
    parse_closure,
    parse_target_space,
    shortfall,
    target_space_command,
)
from tests.unit.test_fleet import fleet, only_problem

GIB, MIB = 1024**3, 1024**2
TOP = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-pi4"
KERNEL = "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-linux-6.1/Image"
INITRD = "/nix/store/iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii-initrd-linux-6.1/initrd"
DTBS = "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-linux-6.1/dtbs"


@pytest.mark.parametrize(
    ("text", "size", "percent"),
    [("1G", GIB, None), ("500M", 500 * MIB, None), ("1.5GiB", int(1.5 * GIB), None),
     ("64k", 64 * 1024, None), ("5%", 0, 5.0), (" 2.5 % ", 0, 2.5)],
)  # fmt: skip
def test_a_margin_is_a_size_or_a_percentage(text, size, percent):
    margin = Margin.parse(text)
    assert (margin.size, margin.percent) == (size, percent)
    assert Margin.parse("5%").of(200 * MIB) == 10 * MIB


@pytest.mark.parametrize("text", ["lots", "1X", "-1G", "100%", "G", ""])
def test_a_margin_that_is_neither_is_refused(text):
    with pytest.raises(ValueError):
        Margin.parse(text)


def test_bad_min_free_space_and_boot_dir_stop_the_run_naming_host_key_and_fix(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"min_free_space": "lots"})))
    assert problem.startswith("pi: min_free_space 'lots' is neither a size nor a percentage;")
    assert "'1G' or '500M', or a percentage of the store's filesystem like '5%'" in problem
    problem = only_problem(write_inventory(fleet(pi={"boot_dir": "boot"}), filename="b.py"))
    assert problem.startswith("pi: boot_dir is 'boot'; set it to the absolute path")
    problem = only_problem(write_inventory(fleet(pi={"keep_generations": 0}), filename="k.py"))
    assert problem.startswith("pi: keep_generations is 0; set it to a number of generations")
    problem = only_problem(write_inventory(fleet(pi={"keep_generations": 1}), filename="one.py"))
    assert problem.startswith("pi: keep_generations is 1, which leaves no generation to roll")
    for n, keep in enumerate((2**63, 1001, "1001", "-3", True)):
        problem = only_problem(
            write_inventory(fleet(pi={"keep_generations": keep}), filename=f"big{n}.py")
        )
        assert problem == (
            f"pi: keep_generations is {keep!r}; set it to a number of generations from 2 to 1000"
        )
    from operations.data.fleet import check_fleet

    specs = check_fleet(write_inventory(fleet(pi={"keep_generations": "1000"}), filename="m.py"))
    assert specs["pi"].keep_generations == 1000
    problem = only_problem(write_inventory(fleet(pi={"gc_after_deploy": "yes"}), filename="g.py"))
    assert problem.startswith("pi: gc_after_deploy is 'yes'; set it to True or False")


def test_a_pi_checks_its_boot_dir_by_default_and_an_x86_host_does_not(write_inventory):
    from operations.data.fleet import check_fleet

    specs = check_fleet(write_inventory(fleet()))
    assert specs["pi"].boot_dir == "/boot"
    assert specs["pi"].min_free_space == Margin.parse("1G")
    assert specs["nas"].boot_dir is None
    data = {"boot_dir": "/boot/firmware/", "min_free_space": "5%"}
    specs = check_fleet(write_inventory(fleet(pi=data), filename="other.py"))
    assert specs["pi"].boot_dir == "/boot/firmware"
    assert specs["pi"].min_free_space.percent == 5.0


def test_the_builder_answers_each_paths_nar_size_and_the_boot_files():
    lines = [
        json.dumps([{"path": TOP, "narSize": 1000}, {"path": KERNEL[:-6], "narSize": 9 * MIB}]),
        f"nixpush-boot-file kernel {8 * MIB} 1 {KERNEL}",
        f"nixpush-boot-file initrd {20 * MIB} 1 {INITRD}",
        f"nixpush-boot-file dtbs {30 * MIB} 1200 {DTBS}",
    ]
    closure = parse_closure(lines)
    assert closure == Closure(
        {TOP: 1000, KERNEL[:-6]: 9 * MIB},
        (
            BootFile("kernel", KERNEL, 8 * MIB),
            BootFile("initrd", INITRD, 20 * MIB),
            BootFile("dtbs", DTBS, 30 * MIB, 1200),
        ),
    )
    assert parse_closure(["error: path '/nix/store/x' is not valid"]) is None
    assert parse_closure([lines[0], f"nixpush-boot-file dtbs 1 {DTBS}"]) is None  # cut short
    assert boot_name(KERNEL) == "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-linux-6.1-Image"


def test_commands_quote_every_value():
    hostile = "/nix/store/x-a b; whoami $(id)"
    builder = closure_command(hostile).get_raw_value()
    assert "--recursive '/nix/store/x-a b; whoami $(id)' &&" in builder
    assert "readlink -e '/nix/store/x-a b; whoami $(id)'/\"$item\" )" in builder
    closure = Closure({}, (BootFile("kernel", hostile, 1),))
    target = target_space_command(closure, "/bo ot;id").get_raw_value()
    assert "df -Pk '/bo ot;id'" in target
    assert "stat -f -c %S '/bo ot;id'" in target
    assert "[ -e '/bo ot;id/nixos/x-a b; whoami $(id)' ]" in target
    assert "echo nixpush-boot-present 'x-a b; whoami $(id)' ;" in target


def _space(free, missing, *, boot=None, boot_needed=0, total=16 * GIB):
    store = Filesystem(total, free, "/nix")
    items = ("kernel", "initrd", "dtbs") if boot_needed else ()
    return TargetSpace(store, boot, missing, 3, boot_needed, items)


def test_a_copy_that_fits_with_the_margin_passes_and_one_that_does_not_gives_the_numbers():
    margin = Margin.parse("1G")
    assert shortfall("pi4", _space(3 * GIB, int(1.9 * GIB)), margin, "/boot") is None
    assert shortfall("pi4", _space(0, 0), margin, "/boot") is None  # nothing to copy
    problem = shortfall("pi4", _space(int(0.8 * GIB), int(1.9 * GIB)), margin, "/boot")
    assert problem == (
        "pi4: /nix has 819.2 MiB free, the copy needs 1.9 GiB more and min_free_space keeps "
        "1.0 GiB (1G) free: free 2.1 GiB on pi4 (`nix-collect-garbage -d`, or set "
        "keep_generations and gc_after_deploy) or lower min_free_space"
    )
    # A percentage is of the store's filesystem.
    assert shortfall("pi4", _space(GIB, 800 * MIB), Margin.parse("1%"), None) is None
    problem = shortfall("pi4", _space(GIB, 900 * MIB), Margin.parse("10%"), None)
    assert problem is not None
    assert "needs 900.0 MiB more and min_free_space keeps 1.6 GiB (10%) free" in problem


def test_a_full_boot_partition_is_refused_and_a_shared_one_adds_to_the_store():
    margin = Margin.parse("0")
    small_boot = Filesystem(64 * MIB, 10 * MIB, "/boot")
    problem = shortfall("pi4", _space(GIB, MIB, boot=small_boot, boot_needed=28 * MIB), margin,
                        "/boot")  # fmt: skip
    assert problem == (
        "pi4: /boot has 10.0 MiB free, the boot loader's new kernel, initrd and device trees "
        "(dtbs) need 28.0 MiB and 1.0 MiB stays free besides: remove old generations "
        "(keep_generations) and their files in /boot/nixos, or set boot_dir to where they go"
    )
    # The margin: files that fill the partition exactly do not fit, one MiB less does.
    full = Filesystem(64 * MIB, 28 * MIB, "/boot")
    assert shortfall("pi4", _space(GIB, MIB, boot=full, boot_needed=28 * MIB), margin, "/boot")
    fits = _space(GIB, MIB, boot=full, boot_needed=28 * MIB - BOOT_MARGIN)
    assert shortfall("pi4", fits, margin, "/boot") is None
    shared = Filesystem(16 * GIB, 30 * MIB, "/nix")
    problem = shortfall("pi4", _space(30 * MIB, 10 * MIB, boot=shared, boot_needed=28 * MIB),
                        margin, "/boot")  # fmt: skip
    assert problem is not None
    assert "the copy and the new kernel, initrd and device trees (dtbs) needs 38.0 MiB" in problem
    assert human(512) == "0.5 KiB"


def test_the_target_answer_counts_missing_paths_and_boot_files_not_there_yet():
    boot_files = (
        BootFile("kernel", KERNEL, 8 * MIB),
        BootFile("initrd", INITRD, MIB),
        BootFile("dtbs", DTBS, 30 * MIB, 1200),
    )
    closure = Closure({TOP: 5 * MIB, "/nix/store/b-x": 7 * MIB}, boot_files)
    lines = [
        "nixpush-df store",
        "/dev/mmcblk0p2 15000000 9000000 1000000 90% /",
        "nixpush-df boot",
        "/dev/mmcblk0p1 250000 100000 150000 40% /boot",
        "nixpush-boot-block 2048",
        f"nixpush-boot-present {boot_name(INITRD)}",
        "nixpush-invalid",
        TOP,
    ]
    space = parse_target_space(lines, closure, "/boot")
    # Every file up to a whole block of 2 KiB: the kernel's one, the device trees' 1200.
    assert space == TargetSpace(
        Filesystem(15000000 * 1024, 1000000 * 1024, "/"),
        Filesystem(250000 * 1024, 150000 * 1024, "/boot"),
        5 * MIB, 1, 8 * MIB + 2048 + 30 * MIB + 1200 * 2048, ("kernel", "dtbs"),
    )  # fmt: skip
    # No block size read: 4 KiB.
    space = parse_target_space([*lines[:4], *lines[5:]], closure, "/boot")
    assert space is not None
    assert space.boot_needed == 38 * MIB + 1201 * 4096
    assert parse_target_space(lines[:-2], closure, "/boot") is None  # cut short


@pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs Nix")
def test_the_target_command_runs_in_sh_against_a_real_store(tmp_path):
    valid = subprocess.run(
        ["nix-store", "-q", "--requisites", shutil.which("nix-store") or ""],
        capture_output=True, text=True, check=False,
    ).stdout.split()[:1] or []  # fmt: skip
    fake = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-not-there"
    (tmp_path / "nixos").mkdir()
    present = "/nix/store/pppppppppppppppppppppppppppppppp-linux/Image"
    (tmp_path / "nixos" / boot_name(present)).write_text("k")
    closure = Closure({fake: 3 * MIB, **dict.fromkeys(valid, MIB)},
                      (BootFile("kernel", present, 5),
                       BootFile("initrd", "/nix/store/q-initrd/initrd", 7)))  # fmt: skip
    command = target_space_command(closure, str(tmp_path)).get_raw_value()
    result = subprocess.run(
        ["sh", "-c", command], input="\n".join(closure.sizes) + "\n",
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    space = parse_target_space(result.stdout.splitlines(), closure, str(tmp_path))
    assert space is not None
    block = int(subprocess.check_output(["stat", "-f", "-c", "%S", str(tmp_path)], text=True))
    assert (space.missing, space.missing_paths, space.boot_needed) == (3 * MIB, 1, 7 + block)
    assert space.store.free > 0 and space.boot is not None
    assert space.boot_items == ("initrd",)


def test_the_builder_command_counts_a_toplevels_kernel_initrd_and_every_device_tree(tmp_path):
    """closure_command run by sh, ``nix`` a stand-in answering an empty closure, against a
    toplevel laid out like NixOS's: kernel and dtbs links into the kernel's path."""
    kernel_dir, top, bin_dir = tmp_path / "linux", tmp_path / "top", tmp_path / "bin"
    for directory in (kernel_dir / "dtbs" / "broadcom", top, bin_dir):
        directory.mkdir(parents=True)
    (kernel_dir / "Image").write_bytes(b"k" * 1000)
    (kernel_dir / "dtbs" / "broadcom" / "a.dtb").write_bytes(b"d" * 300)
    (kernel_dir / "dtbs" / "broadcom" / "b.dtb").write_bytes(b"d" * 200)
    (kernel_dir / "dtbs" / "c.dtb").write_bytes(b"d" * 100)
    (top / "kernel").symlink_to(kernel_dir / "Image")
    (top / "dtbs").symlink_to(kernel_dir / "dtbs")
    (top / "initrd").write_bytes(b"i" * 70)
    (bin_dir / "nix").write_text("#!/bin/sh\nprintf '[]'\n")
    (bin_dir / "nix").chmod(0o755)
    result = subprocess.run(
        ["sh", "-c", closure_command(str(top)).get_raw_value()],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )  # fmt: skip
    closure = parse_closure(result.stdout.splitlines())
    assert closure is not None
    assert closure.boot_files == (
        BootFile("kernel", str(kernel_dir / "Image"), 1000),
        BootFile("initrd", str(top / "initrd"), 70),
        BootFile("dtbs", str(kernel_dir / "dtbs"), 600, 3),
    )
    (top / "dtbs").unlink()  # a toplevel without device trees: two items
    result = subprocess.run(
        ["sh", "-c", closure_command(str(top)).get_raw_value()],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )  # fmt: skip
    closure = parse_closure(result.stdout.splitlines())
    assert closure is not None
    assert [boot_file.item for boot_file in closure.boot_files] == ["kernel", "initrd"]


def test_a_copy_that_does_not_fit_fails_the_target_before_copying(monkeypatch):
    from operations.data.fleet import HostSpec
    from operations.push import copy
    from operations.push.runcache import RunCache
    from tests.unit.fake_host import FakeHost
    from tests.unit.test_push import BUILDER, NEW, plan

    answers = {
        "nas": [json.dumps([{"path": NEW, "narSize": 2 * GIB}])],
        "pi4": [
            "nixpush-df store",
            "/dev/root 15000000 9000000 524288 95% /",
            "nixpush-invalid",
            NEW,
        ],
    }
    asked: list[tuple[str, str | None]] = []

    def run_on(target, command, **kwargs):
        asked.append((target.name, kwargs.get("stdin")))
        return True, answers[target.name]

    failed: list[str] = []
    monkeypatch.setattr(copy, "run_on", run_on)
    monkeypatch.setattr(copy, "run_watched", lambda *a, **k: pytest.fail("copied"))
    monkeypatch.setattr(copy, "fail", lambda host, reason: failed.append(reason) or False)
    specs = {"pi4": HostSpec(name="pi4", nix_system="aarch64-linux", nixos_config="pi4")}
    step = copy._copy.__wrapped__  # type: ignore[attr-defined]
    to = copy.Destination("10.0.0.2", 22, "beau")
    assert step(None, FakeHost("pi4"), plan(), BUILDER, RunCache(specs), to) is False
    assert failed == [
        "pi4: / has 512.0 MiB free, the copy needs 2.0 GiB more and min_free_space keeps 1.0 GiB "
        "(1G) free: free 2.5 GiB on pi4 (`nix-collect-garbage -d`, or set keep_generations and "
        "gc_after_deploy) or lower min_free_space"
    ]
    # One read on the builder, one round trip to the target, the paths on its stdin.
    assert asked == [("nas", None), ("pi4", NEW)]
