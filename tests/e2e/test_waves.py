"""
Activation waves (deploy_wave, wave_soak) on a bench of four Pis, two per wave: a good
configuration deploys wave 0, soaks, checks it again, then deploys wave 1 (the launch times
read on the targets prove the order); a configuration that fails in wave 0 rolls back there
and leaves wave 1 untouched and ``held`` (its closures copied ahead, nothing activated), exit 1;
so does a canary that cannot be reached (its link down) or whose configuration does not
evaluate: pyinfra runs no deploy code for the first, and the second is never planned, yet each
counts as its wave failing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import pyinfra
from tests.e2e.test_many_targets import PIS
from tests.e2e.test_pi import current, output
from tests.e2e.test_safe import FAST, KNOBS, configure, in_pi, run_dirs

WAVES = {"pi4": 0, "pi5": 0, "pis": 1, "pi6": 1}
SOAK = 4
LIMIT = [arg for pi in PIS for arg in ("--limit", pi)]


@pytest.fixture(scope="module")
def four_pis(bench: None) -> Iterator[None]:
    """Four Pis (one armv7l) on the NAS, prepared as a user would; the default fleet after."""
    default = len(fleet.PIS)
    fleet.up(pis=4)
    from tests.bench.client import prepare_push

    prepare_push()  # the NAS emulates armv7l for pi6; push keys for the new Pis
    yield
    configs = fleet.flake_configs()
    fleet.set_flake_configs(
        {
            name: {k: v for k, v in attrs.items() if k not in KNOBS}
            for name, attrs in configs.items()
        }
    )
    fleet.up(pis=default)


@pytest.fixture
def inventory(tmp_path: Path, four_pis: None) -> str:
    """The bench inventory with the Pis in two waves, each deployed host soaking SOAK s."""
    extra = {name: {"deploy_wave": wave, "wave_soak": SOAK} for name, wave in WAVES.items()}
    path = tmp_path / "waves_inventory.py"
    path.write_text(
        "from tests.bench.inventory import _overlay, common, main, minimal, network, server, work\n"
        f"_EXTRA = {extra!r}\n"
        "minimal, common, network, main, work, server = (\n"
        "    _overlay(g, _EXTRA) for g in (minimal, common, network, main, work, server)\n"
        ")\n"
    )
    return str(path)


def deploy(inventory: str, *args: str, report: Path | None = None):
    env = {**bench_sops.env(), **({"NIXPUSH_REPORT_FILE": str(report)} if report else {})}
    return pyinfra(inventory, "deploys/pi.py", *LIMIT, *FAST, *args, env=env, timeout=900)


def launched_at(name: str) -> float:
    """When the Pi's newest activation was launched (its program installed), on the target."""
    script = 'd=$(ls -1d /run/nixpush/*/ | tail -n 1); stat -c %.3Y "$d/program"'
    return float(in_pi(name, script).strip())


def test_a_good_configuration_deploys_wave_0_then_wave_1(inventory):
    wanted = {pi: configure(pi) for pi in PIS}

    dry = deploy(inventory, "--dry")
    assert dry.returncode == 0, output(dry)
    assert "deploy wave 0 (of 0, 1): activates first; then soaks 4s" in output(dry)
    assert "deploy wave 1 (of 0, 1): activates once wave 0 is deployed and healthy" in output(dry)

    result = deploy(inventory, "-y")
    text = output(result)
    assert result.returncode == 0, text
    assert {pi: current(pi) for pi in PIS} == wanted
    launches = {pi: launched_at(pi) for pi in PIS}
    first = max(launches[pi] for pi, wave in WAVES.items() if wave == 0)
    second = min(launches[pi] for pi, wave in WAVES.items() if wave == 1)
    # Wave 1 launched after wave 0 was confirmed and had soaked SOAK s.
    assert second - first >= SOAK, launches
    soaked = text.index("[pi4] wave 0 deployed here: soaking 4s")
    assert "after the soak: health check" in text
    assert text.index("[pis] activating detached") > soaked
    assert text.index("[pi6] activating detached") > soaked
    assert "[pis] wave 1 deployed here" not in text  # the last wave soaks for nobody


def test_a_failing_configuration_in_wave_0_holds_wave_1_untouched(inventory, tmp_path):
    before = {pi: current(pi) for pi in PIS}
    runs_before = {pi: run_dirs(pi) for pi in ("pis", "pi6")}
    configure("pi4", failActivation=True)
    wanted = {pi: configure(pi) for pi in ("pi5", "pis", "pi6")}

    report = tmp_path / "report.json"
    result = deploy(inventory, "-y", report=report)
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: rolled back: switch-to-configuration test exited 4" in text
    assert "pis: held: wave 0 failed (pi4 rolled back)" in text
    assert "pi6: held: wave 0 failed (pi4 rolled back)" in text
    assert current("pi4") == before["pi4"]
    assert current("pi5") == wanted["pi5"]  # wave 0's other host deployed
    for pi in ("pis", "pi6"):
        assert current(pi) == before[pi]
        assert run_dirs(pi) == runs_before[pi]  # no activation was even launched
        # Builds and copies run ahead: the closure is there, only the activation waited.
        assert in_pi(pi, f"test -e {wanted[pi]} && echo there").strip() == "there"
    hosts = json.loads(report.read_text())["hosts"]
    assert hosts["pis"]["status"] == "held"
    assert hosts["pis"]["cause"] == "wave 0 failed (pi4 rolled back)"
    assert hosts["pi4"]["status"] == "rolled-back"


def held_untouched(before: dict[str, str | None], runs_before: dict[str, int]) -> None:
    """Wave 1 (pis, pi6) still runs what it ran, and no activation was launched on it."""
    for pi in ("pis", "pi6"):
        assert current(pi) == before[pi]
        assert run_dirs(pi) == runs_before[pi]


def test_a_canary_whose_link_is_down_holds_wave_1_untouched(inventory, tmp_path):
    before = {pi: current(pi) for pi in PIS}
    runs_before = {pi: run_dirs(pi) for pi in ("pis", "pi6")}
    wanted = {pi: configure(pi) for pi in PIS}
    fleet.set_link(fleet.host("pi4"), up=False)
    try:
        report = tmp_path / "report.json"
        result = deploy(inventory, "-y", report=report)
    finally:
        fleet.set_link(fleet.host("pi4"), up=True)
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: failed: could not connect" in text
    assert "pis: held: wave 0 failed (pi4 could not connect)" in text
    assert "pi6: held: wave 0 failed (pi4 could not connect)" in text
    assert current("pi4") == before["pi4"]
    assert current("pi5") == wanted["pi5"]  # wave 0's other host deployed
    held_untouched(before, runs_before)
    hosts = json.loads(report.read_text())["hosts"]
    assert hosts["pi4"]["status"] == "failed"
    assert {hosts[pi]["status"] for pi in ("pis", "pi6")} == {"held"}


def test_a_canary_that_does_not_evaluate_holds_wave_1_untouched(inventory, tmp_path):
    before = {pi: current(pi) for pi in PIS}
    runs_before = {pi: run_dirs(pi) for pi in ("pis", "pi6")}
    wanted = {pi: configure(pi) for pi in ("pi5", "pis", "pi6")}
    configs = fleet.flake_configs()
    fleet.set_flake_configs({**configs, "pi4": {**configs["pi4"], "failEval": "throw"}})
    try:
        result = deploy(inventory, "-y")
    finally:
        fleet.set_flake_configs(configs)
    text = output(result)
    assert result.returncode == 1, text
    assert "pi4: failed: " in text
    assert "pis: held: wave 0 failed (pi4 failed before its activation)" in text
    assert "pi6: held: wave 0 failed (pi4 failed before its activation)" in text
    assert current("pi4") == before["pi4"]
    assert current("pi5") == wanted["pi5"]
    held_untouched(before, runs_before)


def test_a_gc_while_wave_1_waits_keeps_its_copied_closure_and_it_deploys(inventory):
    # Wave 0 activates slowly, so wave 1's closures sit copied and not yet activated; a
    # `nix-store --gc` on them then (another controller's gc_after_deploy, the owner's) must
    # leave them, and wave 1 still deploys.
    wanted = {pi: configure(pi) for pi in PIS}
    wanted["pi4"] = configure("pi4", slowActivation="10")
    runs_before = {pi: run_dirs(pi) for pi in ("pis", "pi6")}
    exe = str(Path(sys.executable).with_name("pyinfra"))
    with subprocess.Popen(
        [exe, inventory, "deploys/pi.py", *LIMIT, *FAST, "-y"], cwd=fleet.REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        env=bench_sops.env(),
    ) as run:  # fmt: skip
        deadline = time.monotonic() + 300
        copied = False
        while not copied and time.monotonic() < deadline and run.poll() is None:
            copied = all(
                in_pi(pi, f"test -e {wanted[pi]} && echo there").strip() == "there"
                for pi in ("pis", "pi6")
            )
            time.sleep(0.5)
        assert copied, "wave 1's closures were never copied"
        for pi in ("pis", "pi6"):
            # Between the copy and the activation: no run launched there yet.
            assert run_dirs(pi) == runs_before[pi]
            pinned = in_pi(pi, "readlink /nix/var/nix/gcroots/nixpush-copied/*")
            assert wanted[pi] in pinned.split(), pinned
            in_pi(pi, "nix-store --gc >/dev/null 2>&1")
            assert in_pi(pi, f"test -e {wanted[pi]} && echo there").strip() == "there"
            assert run_dirs(pi) == runs_before[pi]  # the GC ran before the activation
        text, _ = run.communicate(timeout=600)
    assert run.returncode == 0, text
    assert {pi: current(pi) for pi in PIS} == wanted
    for pi in ("pis", "pi6"):  # the programs took the copies' roots over
        assert wanted[pi] not in in_pi(pi, "readlink /nix/var/nix/gcroots/nixpush-copied/*")
