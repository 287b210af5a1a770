"""The systemd bench host's pure parts: units, masks, cgroup bookkeeping, its schedule data."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from operations.data.schedule import parse_schedule
from tests.bench import fleet, systemd_host
from tests.unit.conftest import REPO, load_inventory

SD = next(h for h in fleet.HOSTS if h.systemd)


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for hierarchy in systemd_host.HIERARCHIES:
        (tmp_path / hierarchy).mkdir()
    monkeypatch.setattr(systemd_host, "CGROUP_ROOT", tmp_path)
    return tmp_path


def test_the_systemd_pi_is_a_pi_with_a_three_letter_name():
    assert SD in fleet.PIS and SD.system == "aarch64-linux"
    assert len(SD.name) == 3  # pyinfra pads its output to the longest host name


def test_leftover_cgroups_names_only_this_bench_instances(cgroup_root):
    (cgroup_root / "systemd" / f"nixpush-bench-{SD.netns}" / "init.scope").mkdir(parents=True)
    (cgroup_root / "unified" / "nixpush-bench-np7-pis").mkdir()  # another bench's
    (cgroup_root / "unified" / "unrelated").mkdir()

    assert systemd_host.leftover_cgroups(fleet.NETNS_PREFIX) == [
        f"cgroup {cgroup_root / 'systemd' / f'nixpush-bench-{SD.netns}'}"
    ]


def test_remove_cgroups_goes_bottom_up(cgroup_root):
    for cgroup in systemd_host.cgroups(SD):
        (cgroup / "system.slice" / "nixpush-bench-sshd.service").mkdir(parents=True)
        (cgroup / "init.scope").mkdir()

    systemd_host.remove_cgroups(SD)

    assert systemd_host.leftover_cgroups(fleet.NETNS_PREFIX) == []
    assert all((cgroup_root / h).is_dir() for h in systemd_host.HIERARCHIES)


def test_masks_cover_what_acts_on_the_machine_but_keep_nix():
    masked = systemd_host.masked_units()
    acting_on_the_machine = (
        "systemd-binfmt.service", "systemd-sysctl.service", "systemd-tmpfiles-setup-dev.service",
        "ssh.service", "postgresql.service", "getty.target",
    )  # fmt: skip
    for unit in acting_on_the_machine:
        assert unit in masked
    assert not set(systemd_host.KEEP_ENABLED) & set(masked)
    timers = {p.name for d in systemd_host.UNIT_DIRS for p in d.glob("*.wants/*.timer")}
    assert timers <= set(masked)


def test_units_boot_journald_sshd_and_nix_with_the_bench_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(fleet, "BENCH_DIR", tmp_path)
    host = replace(SD, name="pix")

    systemd_host.write_units(host, {"NIXPUSH_BENCH_INSTANCE": "3"})

    units = host.dir / "etc-upper" / "systemd" / "system"
    target = (units / systemd_host.TARGET).read_text()
    assert "Requires=basic.target\n" in target
    assert f"Wants={systemd_host.SSHD_UNIT} nix-daemon.socket" in target
    sshd = (units / systemd_host.SSHD_UNIT).read_text()
    assert f"ExecStart=/usr/sbin/sshd -D -e -f {host.dir}/ssh/sshd_config\n" in sshd
    assert (units / "ssh.service").readlink() == Path("/dev/null")
    conf = host.dir / "etc-upper" / "systemd" / "system.conf.d" / "nixpush-bench.conf"
    assert "DefaultEnvironment=NIXPUSH_BENCH_INSTANCE=3\n" in conf.read_text()


def test_schedule_inventory_schedules_a_check_of_the_systemd_pi_only():
    inventory = load_inventory(REPO / "tests" / "bench" / "schedule_inventory.py", REPO)
    scheduled = {h.name for h in inventory if (h.data.get("schedule") or {}).get("enabled")}
    assert scheduled == {SD.name}
    schedule = parse_schedule(SD.name, inventory.get_host(SD.name).data.schedule)
    assert schedule.enabled and schedule.activate
    assert [(run.mode, run.limit) for run in schedule.runs] == [("check", (SD.name,))]
    assert schedule.program.startswith(str(fleet.BENCH_DIR))  # visible inside the host
    # So is the checkout it runs from, wherever this one is (its /root, /home, /tmp are its own).
    assert schedule.checkout == str(systemd_host.runner_checkout(fleet.BENCH_DIR))


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_copy_checkout_copies_the_work_tree_as_it_is_but_what_git_ignores(tmp_path):
    repo = tmp_path / "repo"
    (repo / "operations").mkdir(parents=True)
    (repo / ".gitignore").write_text(".venv/\n__pycache__/\n")
    (repo / "operations" / "a.py").write_text("committed\n")
    (repo / "gone.py").write_text("deleted, not committed\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    (repo / "operations" / "a.py").write_text("changed, not committed\n")
    (repo / "operations" / "new.py").write_text("untracked\n")
    (repo / "gone.py").unlink()
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("ignored\n")
    dest = tmp_path / "copy"
    (dest / "stale").mkdir(parents=True)  # from an earlier copy: goes

    systemd_host.copy_checkout(repo, dest)

    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == [".gitignore", "operations/a.py", "operations/new.py"]
    assert (dest / "operations" / "a.py").read_text() == "changed, not committed\n"


def test_copy_checkout_of_a_plain_directory_leaves_out_virtualenvs_caches_and_git(tmp_path):
    repo = tmp_path / "unpacked"
    for name in ("operations/a.py", ".venv/bin/python", "operations/__pycache__/a.pyc",
                 ".mypy_cache/x", "nixpush.egg-info/PKG-INFO", ".git/HEAD"):  # fmt: skip
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    dest = tmp_path / "copy"

    systemd_host.copy_checkout(repo, dest)

    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "operations/a.py"
    ]
