"""deploys/nas.py on the bench: the NAS becomes the Pis' builder (QEMU binfmt, Nix settings).

Every run is the pyinfra CLI as a user types it, from the repository root; hosts are checked
with testinfra. QEMU handlers are kernel-global: tests that remove one restore the machine's
registrations as they found them (``machine_binfmt``), and every test puts the builder's
nix.conf, /etc/binfmt.d and /etc/NIXOS back as found (``builder_state``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import testinfra
from pyinfra.api.state import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

from operations.builder.binfmt import LOCAL_BINFMT_DIR, MANAGED_MARKER, handler_name
from operations.builder.nix import (
    DAEMON_SOCKET,
    NIX_CONF,
    start_daemon_detached,
    stop_daemon_listener,
    wait_for_daemon_socket,
)
from operations.core.models import NIXOS_MARKER
from operations.data.fleet import HostSpec, builders, check_fleet
from tests.bench import fleet
from tests.bench.client import BENCH_INVENTORY, REPO, pyinfra

DEPLOY = "deploys/nas.py"
OPS = ("Register QEMU binfmt handlers", "Let Nix build for the emulated systems")
# Runs on every builder; on one with no pool (remote_builders) and no machines file, a noop.
POOL_OP = "List the build pool in /etc/nix/machines"
MACHINE_BINFMT = Path("/proc/sys/fs/binfmt_misc")


# -- the fleet, from the bench inventory as the CLI loads it ----------------------------


@dataclass(frozen=True)
class Fleet:
    specs: dict[str, HostSpec]
    builder: str  # the one host that builds for others
    pi: str  # an aarch64 target it builds for


@cache
def bench_fleet() -> Fleet:
    with ctx_state.use(State()):
        inventory = make_inventory(str(REPO / BENCH_INVENTORY), cwd=str(REPO))
    specs = check_fleet(inventory)
    (builder,) = builders(specs)
    pi = next(
        name
        for name, spec in specs.items()
        if spec.builder_host == builder and spec.nix_system == "aarch64-linux"
    )
    return Fleet(specs, builder, pi)


@cache
def builder_host() -> Any:
    """testinfra's host for the builder, over one shared SSH connection.

    Like ``client.on_host``, plus a ControlPath: testinfra's ControlMaster has none by default,
    so every check would pay a full SSH handshake (~0.25 s; these tests make a hundred).
    """
    h = fleet.host(bench_fleet().builder)
    return testinfra.get_host(
        f"ssh://{h.name}?sudo={'false' if h.user == 'root' else 'true'}",
        ssh_config=str(fleet.BENCH_DIR / "ssh_config"),
        controlpath="/tmp/nixpush-e2e-nas-%%C",  # testinfra %-formats the ssh command
        controlpersist=10,
    )


# -- reading and resetting the builder --------------------------------------------------


def nix_conf() -> str:
    return str(builder_host().file(NIX_CONF).content_string)


def binfmt_d() -> dict[str, str]:
    """/etc/binfmt.d on the builder: file name -> content."""
    host = builder_host()
    names = host.run("ls -1 %s", LOCAL_BINFMT_DIR).stdout.split()
    return {name: host.file(f"{LOCAL_BINFMT_DIR}/{name}").content_string for name in names}


def daemon_listener() -> str:
    """The pid of the nix-daemon listening on the builder's socket ('' if none)."""
    command = "ss -xlpnH src %s | grep -o 'pid=[0-9]*' || true"
    return str(builder_host().run(command, DAEMON_SOCKET).stdout.strip())


def restart_daemon() -> None:
    host = builder_host()
    for command in (stop_daemon_listener(), start_daemon_detached(), wait_for_daemon_socket()):
        host.run_expect([0], command.get_raw_value())


def write_nix_conf(text: str) -> None:
    """Write the builder's nix.conf and restart its daemon, as an owner editing by hand would."""
    builder_host().run_expect([0], "printf %%s %s > %s", text, NIX_CONF)
    restart_daemon()


def reset_nix_conf() -> None:
    """The bench's own nix.conf: no extra-platforms, no max-jobs."""
    write_nix_conf(fleet.nix_conf_text(fleet.host(bench_fleet().builder)))
    assert "extra-platforms" not in nix_conf()


def machine_handlers() -> dict[str, str | None]:
    """The bench's QEMU handlers as the kernel reports them (machine-wide), by Nix system."""
    found: dict[str, str | None] = {}
    for system, name in fleet.QEMU_HANDLERS.items():
        entry = MACHINE_BINFMT / name
        found[system] = entry.read_text() if entry.exists() else None
    return found


@pytest.fixture
def machine_binfmt(bench: None) -> Iterator[None]:
    """Put the machine's QEMU handlers back exactly as found: others' Pis need aarch64."""
    found = machine_handlers()
    assert set(fleet.registered_binfmt()) == {s for s, text in found.items() if text}
    yield
    now = machine_handlers()
    changed = [system for system in found if now[system] != found[system]]
    fleet.unregister_binfmt(changed)
    fleet.register_binfmt([system for system in changed if found[system] is not None])
    assert machine_handlers() == found


@pytest.fixture
def builder_state(bench: None) -> Iterator[None]:
    """Put the builder's nix.conf, /etc/binfmt.d and /etc/NIXOS back as found."""
    host = builder_host()
    conf, confs = nix_conf(), binfmt_d()
    assert not host.file(NIXOS_MARKER).exists
    yield
    host.run_expect([0], "rm -f %s", NIXOS_MARKER)
    now = binfmt_d()
    for name in now.keys() - confs.keys():
        host.run_expect([0], "rm -f %s", f"{LOCAL_BINFMT_DIR}/{name}")
    for name, text in confs.items():
        if now.get(name) != text:
            host.run_expect([0], "printf %%s %s > %s", text, f"{LOCAL_BINFMT_DIR}/{name}")
    if nix_conf() != conf:
        write_nix_conf(conf)
    assert (nix_conf(), binfmt_d()) == (conf, confs)


@pytest.fixture(scope="module")
def build_flake(bench: None) -> Iterator[str]:
    """A copy of the bench flake whose Pi and armv7 systems no store holds yet.

    The shared flake's toplevels may already be in the builder's store (others' tests build
    them), and a build that finds its output in the store proves nothing.
    """
    specs = bench_fleet().specs
    pi = bench_fleet().pi
    version = f"nas-e2e-{time.time_ns()}"
    directory = fleet.BENCH_DIR / "e2e-nas" / "flake"
    shutil.rmtree(directory.parent, ignore_errors=True)
    shutil.copytree(fleet.FLAKE_TEMPLATE, directory)
    for system, arch_dir in (("aarch64-linux", "aarch64"), ("armv7l-linux", "armv7l")):
        (directory / "bb" / arch_dir).mkdir(parents=True)
        shutil.copy2(busybox(system), directory / "bb" / arch_dir / "busybox")
    configs = {pi: specs[pi].nix_system, "armv7": "armv7l-linux"}
    (directory / "hosts.nix").write_text(
        "{\n"
        + "".join(
            f'  {name} = {{ system = "{s}"; version = "{version}"; }};\n'
            for name, s in configs.items()
        )
        + "}\n"
    )
    yield f"path:{directory}"
    shutil.rmtree(directory.parent, ignore_errors=True)


def binfmt_conf(system: str) -> str:
    return f"{LOCAL_BINFMT_DIR}/{handler_name(system)}.conf"


def busybox(system: str) -> Path:
    return fleet.BENCH_DIR / "busybox" / system / "busybox"


def build(flake: str, config: str) -> Any:
    """``nix build`` of a configuration's toplevel on the builder, as root (its local store)."""
    attr = f"{flake}#nixosConfigurations.{config}.config.system.build.toplevel"
    return builder_host().run("nix build %s --no-link --json", attr)


def built_arch(result: Any) -> str:
    assert result.rc == 0, result.stderr
    out = json.loads(result.stdout)[0]["outputs"]["out"]
    return str(builder_host().file(f"{out}/build-arch").content_string.strip())


# -- running the deploy -----------------------------------------------------------------


def deploy(*args: str, inventory: str = BENCH_INVENTORY) -> tuple[int, str]:
    """``pyinfra -y INVENTORY deploys/nas.py`` (``args`` first); its exit code and log."""
    result = pyinfra(*args, inventory, DEPLOY)
    return result.returncode, result.stdout + result.stderr


def op_sections(log: str) -> dict[str, str]:
    """The log of each operation, from its "Starting operation" line to the next."""
    parts = re.split(r"^--> Starting operation: (.*?) *$", log, flags=re.MULTILINE)
    return {
        op: section.split("--> Results:")[0]
        for op, section in zip(parts[1::2], parts[2::2], strict=True)
    }


def server_data_inventory(tmp_path: Path, systems: list[str]) -> str:
    """The bench inventory with the server root's ``binfmt_emulated_systems`` set to ``systems``,
    the way the owner edits group_data/server.py (an inventory's own group_data wins)."""
    (tmp_path / "group_data").mkdir(parents=True)
    (tmp_path / "inventory.py").write_text(
        "from tests.bench.inventory import common, main, minimal, network, server  # noqa: F401\n"
    )
    (tmp_path / "group_data" / "server.py").write_text(f"binfmt_emulated_systems = {systems!r}\n")
    return str(tmp_path / "inventory.py")


# -- the tests --------------------------------------------------------------------------


def test_builder_without_qemu_cannot_build_a_pi_and_after_the_deploy_builds_it_as_aarch64(
    builder_state: None, machine_binfmt: None, build_flake: str
) -> None:
    nas, pi = builder_host(), bench_fleet().pi
    reset_nix_conf()
    fleet.unregister_binfmt(["aarch64-linux"])  # machine-wide: keep this window short

    failed = build(build_flake, pi)
    assert failed.rc != 0
    assert "a 'aarch64-linux' with features {} is required" in failed.stderr

    before = daemon_listener()
    rc, log = deploy("-y")
    assert rc == 0, log
    assert built_arch(build(build_flake, pi)) == "aarch64"

    # The kernel's handler, with the fix-binary flag, persisted for the next boot.
    handler = machine_handlers()["aarch64-linux"]
    assert handler is not None and handler.startswith("enabled")
    assert re.search(r"^flags: \w*F", handler, flags=re.MULTILINE)
    conf = nas.file(binfmt_conf("aarch64-linux")).content_string
    assert conf.startswith(MANAGED_MARKER + "\n:qemu-aarch64:M:")
    assert conf.rstrip().endswith(":OPF")
    # nix.conf: extra-platforms added, Nix's default platforms kept, max-jobs from the data.
    settings = nas.check_output("nix show-config --json")
    config = {key: entry["value"] for key, entry in json.loads(settings).items()}
    assert {"aarch64-linux", "i686-linux"} <= set(config["extra-platforms"])
    assert config["max-jobs"] == bench_fleet().specs[bench_fleet().builder].nix_max_jobs
    # The daemon was restarted without systemd, outlived pyinfra's SSH session and answers.
    after = daemon_listener()
    assert after and after != before
    nas.run_expect([0], "nix store ping --store daemon")


def test_dry_run_shows_the_missing_handler_and_changes_nothing(
    builder_state: None, machine_binfmt: None
) -> None:
    reset_nix_conf()
    conf, confs = nix_conf(), binfmt_d()
    fleet.unregister_binfmt(["aarch64-linux"])

    result = pyinfra("--dry", BENCH_INVENTORY, DEPLOY)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    changes = log.split("--> Detected changes:")[1]
    for op in OPS:
        assert re.search(rf"^ *{re.escape(op)} +1 \({bench_fleet().builder}\)", changes, re.M), log

    assert "aarch64-linux" not in fleet.registered_binfmt()
    assert (nix_conf(), binfmt_d()) == (conf, confs)


def test_a_second_run_changes_nothing_and_says_so(builder_state: None) -> None:
    rc, log = deploy("-y")
    assert rc == 0, log
    conf, listener = nix_conf(), daemon_listener()

    rc, log = deploy("-y", "-v")
    assert rc == 0, log
    builder = bench_fleet().builder
    sections = op_sections(log)
    assert sorted(sections) == sorted((*OPS, POOL_OP))
    noops = {
        POOL_OP: f"[{builder}] noop: {builder} has no pool and no /etc/nix/machines",
        OPS[0]: (
            f"[{builder}] noop: binfmt handlers qemu-aarch64 are enabled with flag F "
            "and persisted in /etc/binfmt.d"
        ),
        OPS[1]: f"[{builder}] noop: /etc/nix/nix.conf already sets extra-platforms, max-jobs",
    }
    for op, noop in noops.items():
        assert noop in sections[op], sections[op]
        assert f"[{builder}] No changes" in sections[op], sections[op]
        assert f"[{builder}] Success" not in sections[op]
    for name in bench_fleet().specs.keys() - {builder}:
        assert f"[{name}] noop: {name} builds for nobody" in log
    assert (nix_conf(), daemon_listener()) == (conf, listener)


def test_hand_edited_nix_conf_is_corrected_keeping_the_owners_comment(builder_state: None) -> None:
    rc, log = deploy("-y")
    assert rc == 0, log
    edited = nix_conf().replace("max-jobs = 8", "max-jobs = 3")
    edited += "# the owner's note: keep this line\n"
    assert "max-jobs = 3" in edited
    write_nix_conf(edited)

    rc, log = deploy("-y")
    assert rc == 0, log
    assert nix_conf() == edited.replace("max-jobs = 3", "max-jobs = 8")


def test_armv7l_added_to_the_data_runs_armv7l_programs_and_builds_armv7l(
    builder_state: None, machine_binfmt: None, build_flake: str, tmp_path: Path
) -> None:
    nas = builder_host()
    armhf_busybox = str(busybox("armv7l-linux"))
    fleet.unregister_binfmt(["armv7l-linux"])  # only the bench's armv7 config uses it
    assert nas.run("%s uname -m", armhf_busybox).rc != 0

    both = server_data_inventory(tmp_path / "both", ["aarch64-linux", "armv7l-linux"])
    rc, log = deploy("-y", inventory=both)
    assert rc == 0, log
    assert nas.check_output("%s uname -m", armhf_busybox) == "armv7l"
    assert built_arch(build(build_flake, "armv7")) == "armv7l"
    assert f"{handler_name('armv7l-linux')}.conf" in binfmt_d()

    # Removed from the data again: the handler nixpush registered goes, with its file.
    rc, log = deploy("-y")
    assert rc == 0, log
    assert "armv7l-linux" not in fleet.registered_binfmt()
    assert f"{handler_name('armv7l-linux')}.conf" not in binfmt_d()
    assert "aarch64-linux" in fleet.registered_binfmt()


def test_unknown_system_is_refused_before_anything_is_applied(
    builder_state: None, tmp_path: Path
) -> None:
    reset_nix_conf()
    conf, confs, listener = nix_conf(), binfmt_d(), daemon_listener()

    bad = server_data_inventory(tmp_path / "bad", ["aarch64-linux", "aarch65-linux"])
    rc, log = deploy("-y", inventory=bad)
    assert rc != 0
    assert (
        f"{bench_fleet().builder}: binfmt_emulated_systems has unknown system 'aarch65-linux'; "
        "known: x86_64-linux, i686-linux, aarch64-linux"
    ) in log
    assert "Starting operation" not in log
    assert (nix_conf(), binfmt_d(), daemon_listener()) == (conf, confs, listener)


def test_a_builder_it_cannot_set_up_fails_before_nix_conf_changes(builder_state: None) -> None:
    nas = builder_host()
    reset_nix_conf()
    # The owner's own file for the handler, registering it without the fix-binary flag.
    line = nas.file("/usr/lib/binfmt.d/qemu-aarch64.conf").content_string.strip()
    assert line.endswith(":OPF")
    nas.run_expect([0], "printf '%%s\\n' %s > %s", line[: -len("F")], binfmt_conf("aarch64-linux"))
    conf, confs, listener, handlers = nix_conf(), binfmt_d(), daemon_listener(), machine_handlers()

    rc, log = deploy("-y")
    assert rc != 0
    assert (
        f"{bench_fleet().builder}: {binfmt_conf('aarch64-linux')} was not written by nixpush"
    ) in log
    assert f"[{bench_fleet().builder}]" not in op_sections(log)[OPS[1]]  # dropped before it
    assert (nix_conf(), binfmt_d(), daemon_listener()) == (conf, confs, listener)
    assert machine_handlers() == handlers


def test_nixos_builder_is_told_which_options_to_set_and_nothing_is_written(
    builder_state: None,
) -> None:
    nas, builder = builder_host(), bench_fleet().builder
    max_jobs = bench_fleet().specs[builder].nix_max_jobs
    reset_nix_conf()
    nas.run_expect([0], "touch %s", NIXOS_MARKER)
    conf, confs, listener = nix_conf(), binfmt_d(), daemon_listener()

    rc, log = deploy("-y")
    assert rc != 0
    assert (
        f'{builder} runs NixOS: set boot.binfmt.emulatedSystems = [ "aarch64-linux" ]; and '
        f"nix.settings.max-jobs = {max_jobs}; in its configuration, then rebuild it"
    ) in log
    assert (nix_conf(), binfmt_d(), daemon_listener()) == (conf, confs, listener)


@contextmanager
def daemon_refusing(setting: str) -> Iterator[None]:
    """On the builder only, a ``nix-daemon`` first on root's PATH that exits at once while
    nix.conf has the line ``setting`` (like a daemon that can't start with a new setting),
    and otherwise starts the real one. A bind mount in the builder's own mount namespace:
    the machine's ``/usr/local/sbin`` and other hosts never see it."""
    nas = fleet.host(bench_fleet().builder)
    sbin = fleet.BENCH_DIR / "e2e-nas" / "sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    wrapper = sbin / "nix-daemon"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"if grep -qx '{setting}' {NIX_CONF}; then echo 'nix-daemon: refusing' >&2; exit 1; fi\n"
        'exec /usr/bin/nix-daemon "$@"\n'
    )
    wrapper.chmod(0o755)
    fleet.run(fleet.in_host(nas, ["mount", "--bind", str(sbin), "/usr/local/sbin"]))
    try:
        yield
    finally:
        fleet.run(fleet.in_host(nas, ["umount", "/usr/local/sbin"]))
        shutil.rmtree(sbin)


def test_a_daemon_that_cannot_start_on_the_new_nix_conf_gets_the_previous_one_back(
    builder_state: None,
) -> None:
    nas, builder = builder_host(), bench_fleet().builder
    rc, log = deploy("-y")
    assert rc == 0, log
    conf, listener = nix_conf(), daemon_listener()
    owner_mode = nas.check_output("stat -c '%%U %%G %%a' %s", NIX_CONF)
    assert "max-jobs = 8" in conf

    with daemon_refusing("max-jobs = 7"):
        rc, log = deploy("-y", "--data", "nix_max_jobs=7")

        assert rc != 0
        assert (
            f"{builder}: nix-daemon did not answer after {NIX_CONF} changed (nix-daemon does "
            f"not answer on {DAEMON_SOCKET}); the previous {NIX_CONF} is back and the daemon "
            "answers again"
        ) in log, log[-3000:]
        # The old file, byte for byte, owner and mode; a new daemon serving it.
        assert nix_conf() == conf
        assert nas.check_output("stat -c '%%U %%G %%a' %s", NIX_CONF) == owner_mode
        assert daemon_listener() not in ("", listener)
        nas.run_expect([0], "nix store ping --store daemon")
        assert nas.check_output("ls -A /etc/nix") == "nix.conf"  # no backup, no temp file left


def test_nix_conf_is_replaced_atomically_keeping_its_mode(builder_state: None) -> None:
    nas = builder_host()
    reset_nix_conf()
    nas.run_expect([0], "chmod 0640 %s", NIX_CONF)
    inode = nas.check_output("stat -c %%i %s", NIX_CONF)

    rc, log = deploy("-y")

    assert rc == 0, log
    assert "max-jobs = 8" in nix_conf()
    assert nas.check_output("stat -c '%%a %%U' %s", NIX_CONF) == "640 root"
    assert nas.check_output("stat -c %%i %s", NIX_CONF) != inode  # renamed in, not rewritten
    assert nas.check_output("ls -A /etc/nix") == "nix.conf"
