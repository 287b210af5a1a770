"""
The whole fleet on the bench: the NAS deploying itself, an x86_64 desktop built on
the NAS and pushed, a host that may be offline, images built for a host that is never
connected, and selecting hosts by root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra, ssh
from tests.e2e.test_pi import (
    current,
    current_configs,
    deploy,
    derivation,
    desired_path,
    new_versions,
    output,
    profile,
)

NAS = fleet.BUILDER
DESKTOP = fleet.DESKTOP.name  # pc1: x86_64, built on the NAS, pushed


@pytest.fixture
def desktop_link_restored() -> object:
    yield None
    fleet.set_link(fleet.host(DESKTOP), up=True)


def totals(text: str) -> list[str]:
    """pyinfra's "Grand total" row: hosts, success, error, no change."""
    return next(line for line in text.splitlines() if "Grand total" in line).split()[2:]


def test_the_nas_deploys_itself_with_no_copy_and_a_rerun_changes_nothing(push_ready):
    new_versions(NAS)
    wanted = desired_path(NAS)

    result = deploy("--limit", NAS)

    text = output(result)
    assert result.returncode == 0, text
    assert current(NAS) == wanted and profile(NAS) == wanted
    assert f"[{NAS}] built {wanted} on {NAS}" in text
    # Built and activated in place: nothing signed, copied or trusted.
    for step in ("Sign the closure", "Copy the closure", "Authorize the builder", "Trust paths"):
        assert step not in text, text
    assert "confirmed over a new SSH connection" in text
    assert on_host(NAS).file(f"{wanted}/build-arch").content_string.strip() == "x86_64"
    assert f"{NAS}: deployed: switch {wanted}" in text

    again = deploy("--limit", NAS)

    assert again.returncode == 0, output(again)
    assert f"{NAS}: unchanged: {NAS} already runs {wanted}" in output(again)
    assert totals(output(again))[1:3] == ["-", "-"]  # no success, no error: all no-change


def test_controller_on_the_nas_deploys_the_nas_itself(push_ready):
    """The owner's setup: pyinfra runs on the NAS and the NAS is one of its targets."""
    new_versions(NAS)
    wanted = desired_path(NAS)
    nas_init = fleet.init_pid(fleet.host(NAS))
    argv = [str(Path(sys.executable).with_name("pyinfra")), "-y", BENCH_INVENTORY, "deploys/pi.py"]

    result = subprocess.run(
        ["nsenter", "-t", str(nas_init), "-n", "-u", "--", *argv, "--limit", NAS],
        cwd=fleet.REPO, text=True, capture_output=True, timeout=300,
        stdin=subprocess.DEVNULL, env=bench_sops.env(),
    )  # fmt: skip

    assert result.returncode == 0, output(result)
    assert current(NAS) == wanted
    assert "confirmed over a new SSH connection" in output(result)


def test_x86_64_desktop_is_built_on_the_nas_pushed_and_activated(push_ready):
    new_versions(DESKTOP)
    wanted = desired_path(DESKTOP)

    result = deploy("--limit", DESKTOP)

    text = output(result)
    assert result.returncode == 0, text
    assert f"[{DESKTOP}] built {wanted} on {NAS}" in text
    assert f"[{DESKTOP}] copied {wanted} from {NAS}" in text
    assert current(DESKTOP) == wanted and profile(DESKTOP) == wanted
    desktop = on_host(DESKTOP)
    assert desktop.file("/run/bench-activations").content_string.splitlines()[-1] == (
        f"test {wanted} x86_64"  # activated as test; its boot default set once confirmed
    )
    assert not desktop.file(derivation(DESKTOP)).exists  # built on the NAS only
    assert f"{DESKTOP}: deployed: switch {wanted}" in text


def test_offline_ok_host_that_is_down_is_offline_and_the_run_succeeds(
    push_ready, desktop_link_restored, tmp_path
):
    before = current(DESKTOP)
    new_versions(DESKTOP)
    fleet.set_link(fleet.host(DESKTOP), up=False)

    allowed = deploy("--limit", "main", "--data", "offline_ok=true")
    refused = deploy("--limit", "main")

    assert allowed.returncode == 0, output(allowed)
    assert f"{DESKTOP}: offline: unreachable, and offline_ok" in output(allowed)
    assert f"{NAS}: " in output(allowed) and f"{NAS}: failed" not in output(allowed)
    assert refused.returncode == 1, output(refused)
    assert f"{DESKTOP}: failed: could not connect" in output(refused)

    # nixpush-run reads it the same way: offline is not a failure (exit 0).
    inventory = tmp_path / "fleet_with_laptop.py"
    inventory.write_text(
        "from tests.bench.inventory import _overlay, common, main, minimal, network, server, work\n"
        f"minimal = _overlay(minimal, {{{DESKTOP!r}: {{'offline_ok': True}}}})\n"
    )
    state = tmp_path / "state"
    run = subprocess.run(
        [str(Path(sys.executable).with_name("nixpush-run")), "deploy",
         "--inventory", str(inventory), "--state-dir", str(state),
         "--limit", NAS, "--limit", DESKTOP],
        cwd=fleet.REPO, text=True, capture_output=True, timeout=300,
        stdin=subprocess.DEVNULL, env=bench_sops.env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    latest = json.loads((state / "reports" / "latest.json").read_text())
    assert latest["hosts"][DESKTOP]["status"] == "offline"
    assert latest["exit_code"] == 0
    fleet.set_link(fleet.host(DESKTOP), up=True)
    assert current(DESKTOP) == before  # nothing reached it


def test_limit_by_root_deploys_exactly_that_roots_targets(push_ready):
    # `main` on the bench: the NAS and the desktop, not the Pis.
    members = {h.name for h in fleet.HOSTS if "main" in h.roots}
    assert members == {NAS, DESKTOP}
    pi4_before = current("pi4")
    new_versions(NAS, DESKTOP, "pi4")
    wanted = {name: desired_path(name) for name in members}

    result = deploy("--limit", "main")

    text = output(result)
    assert result.returncode == 0, text
    assert {name: current(name) for name in members} == wanted
    assert current("pi4") == pi4_before
    summary = text[text.index("--> nixpush summary:") :].splitlines()[1:]
    assert sorted(line.split(":")[0].strip() for line in summary) == sorted(members)


# -- images ------------------------------------------------------------------------------


def image_inventory(tmp_path: Path, dest: Path) -> Path:
    """The bench fleet plus an image host ``iso`` (never connected) built on the NAS."""
    inventory = tmp_path / "fleet_with_image.py"
    data = {
        "nix_system": "x86_64-linux",
        "builder_host": NAS,
        "flake": fleet.flake_ref(),
        "image_dest": str(dest),
    }
    inventory.write_text(
        "from tests.bench.inventory import common, main, minimal, network, server, work\n"
        f"images = [('@image/iso', {data!r})]\n"
    )
    return inventory


def new_iso(**knobs: str) -> str:
    configs = current_configs()
    configs["iso"] = {"system": "x86_64-linux", "version": uuid.uuid4().hex[:8], **knobs}
    fleet.set_flake_configs(configs)
    return str(configs["iso"]["version"])


def test_image_is_built_on_the_nas_copied_verified_and_a_rerun_does_nothing(push_ready, tmp_path):
    dest = tmp_path / "images"
    dest.mkdir()
    inventory = str(image_inventory(tmp_path, dest))
    version = new_iso()

    dry = pyinfra(inventory, "deploys/image.py", "--dry", env=bench_sops.env())
    assert dry.returncode == 0, output(dry)
    assert "[iso] would build " in output(dry) and "copy its image file to" in output(dry)
    assert not list(dest.iterdir())

    result = pyinfra("-y", inventory, "deploys/image.py", env=bench_sops.env())

    text = output(result)
    assert result.returncode == 0, text
    (copied,) = dest.iterdir()
    assert copied.name == f"nixos-iso-{version}.iso"
    line = next(x for x in text.splitlines() if "[iso] copied image " in x)
    store_file = line.split("copied image ")[1].split(" ")[0]
    assert store_file.startswith("/nix/store/") and store_file.endswith(copied.name)
    on_nas = ssh(NAS, f"sha256sum {store_file}").stdout.split()[0]
    assert on_nas in line and "checksum verified" in line
    import hashlib

    assert hashlib.sha256(copied.read_bytes()).hexdigest() == on_nas
    assert not Path(store_file).exists()  # built on the NAS, never by the controller's Nix
    assert "iso: deployed: image " in text and "256." in text  # size reported (KiB)
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temp file left
    mtime = copied.stat().st_mtime_ns

    again = pyinfra("-y", inventory, "deploys/image.py", env=bench_sops.env())

    assert again.returncode == 0, output(again)
    assert totals(output(again))[1:3] == ["-", "-"], output(again)
    assert "iso: unchanged: image " in output(again)
    assert copied.stat().st_mtime_ns == mtime

    # pi.py leaves the image host alone, and nothing ever ran on it.
    pushed = pyinfra("-y", inventory, "deploys/pi.py", "--limit", "iso", env=bench_sops.env())
    assert pushed.returncode == 0, output(pushed)
    assert "iso: skipped: an image: deploys/image.py builds it" in output(pushed)


def test_an_image_naming_a_file_outside_its_store_path_fails_unread(push_ready, tmp_path):
    # Any flake input can write hydra-build-products: here it names the NAS's /etc/shadow.
    dest = tmp_path / "images"
    dest.mkdir()
    inventory = str(image_inventory(tmp_path, dest))
    new_iso(imageProduct="/etc/shadow")

    result = pyinfra("-y", inventory, "deploys/image.py", env=bench_sops.env())

    text = output(result)
    assert result.returncode == 1, text
    assert (
        "names /etc/shadow (resolving to /etc/shadow) as its image file, which is outside the "
        "store path: nixpush does not read or copy it"
    ) in text
    assert "iso: failed: " in text
    assert list(dest.iterdir()) == []
    shadow = ssh(NAS, "sudo -n sha256sum /etc/shadow || sha256sum /etc/shadow").stdout.split()[0]
    assert shadow not in text  # never hashed for the log either

    # Planned again now that it is built: it fails at planning, with the same cause.
    again = pyinfra("-y", inventory, "deploys/image.py", env=bench_sops.env())
    assert again.returncode == 1 and "which is outside the store path" in output(again)
    assert list(dest.iterdir()) == []


def test_a_pis_sd_image_on_request_is_built_on_the_nas(push_ready, tmp_path):
    new_versions("pi4")
    result = pyinfra(
        "-y", BENCH_INVENTORY, "deploys/image.py", "--limit", "pi4",
        "--data", "image_attr=sdImage", "--data", f"image_dest={tmp_path}",
        env=bench_sops.env(),
    )  # fmt: skip
    text = output(result)
    assert result.returncode == 0, text
    (copied,) = tmp_path.iterdir()
    assert copied.suffix == ".img"
    assert b"built as aarch64" in copied.read_bytes()[:200]  # under QEMU, on the NAS
