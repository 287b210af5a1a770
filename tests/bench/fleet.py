"""The bench fleet: NixOS-like hosts on this one machine, for nixpush's tests and demo.

Each host is a network namespace joined to a bridge, with its own mount, UTS and PID
namespaces in which ``/etc`` is an overlay of the machine's, and ``/nix``, ``/root``,
``/home``, ``/tmp``, ``/boot`` and ``/var/lib/nix-ssh`` are the host's own directories. Its
init starts a nix-daemon, then becomes the host's sshd, so every SSH session lands inside the
host.
The controller (where pyinfra runs) is the root namespace, on the bridge.

Command line: ``python -m tests.bench install|up|down|status|env``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tests.bench import systemd_host

REPO = Path(__file__).resolve().parents[2]
FLAKE_TEMPLATE = Path(__file__).resolve().parent / "flake"
# Several benches can run side by side on one machine (say, two checkouts testing at once):
# NIXPUSH_BENCH_INSTANCE=N (0-9) gives bench N its own bridge, subnet, namespaces and state.
INSTANCE = int(os.environ.get("NIXPUSH_BENCH_INSTANCE", "0"))
if not 0 <= INSTANCE <= 9:
    raise SystemExit(f"NIXPUSH_BENCH_INSTANCE is {INSTANCE}; use 0 to 9")
_SUFFIX = f"-{INSTANCE}" if INSTANCE else ""
BENCH_DIR = Path(os.environ.get("NIXPUSH_BENCH_DIR", f"/var/lib/nixpush-bench{_SUFFIX}"))
BRIDGE = f"npbr{INSTANCE}"
SUBNET = f"10.231.{57 + INSTANCE}"
CONTROLLER_IP = f"{SUBNET}.1"
NETNS_PREFIX = f"np{INSTANCE or ''}-"
# Sockets of the SSH connections testinfra's checks share, one per host (``client.on_host``).
SSH_CONTROL_DIR = BENCH_DIR / "ssh-control"
VETH_PREFIX = f"npv{INSTANCE or ''}-"

APT_PACKAGES = (
    "nix-bin",
    "nix-setup-systemd",
    "qemu-user-static",
    "openssh-server",
    "sudo",
    "age",
    "iproute2",
    "psmisc",
    "procps",
    "shellcheck",
)
# Static busybox per Nix system, from Debian's packages: the emulated Pis' and the native
# x86_64 one (the NAS and the desktop build and run theirs without QEMU).
BUSYBOX_ARCH = {"aarch64-linux": "arm64", "armv7l-linux": "armhf", "x86_64-linux": "amd64"}
# The machine's own architecture: its packages need no `dpkg --add-architecture`.
NATIVE_ARCH = "amd64"
QEMU_HANDLERS = {"aarch64-linux": "qemu-aarch64", "armv7l-linux": "qemu-arm"}


@dataclass(frozen=True)
class BenchHost:
    """One bench host and how the controller reaches it."""

    name: str
    ip: str
    port: int
    user: str
    system: str
    roots: tuple[str, ...]
    # Extra nix.conf lines for the host's own Nix daemon.
    nix_conf: tuple[str, ...] = ()
    # sshd_config settings that replace the bench's defaults (``SSHD_DEFAULTS``).
    sshd_options: tuple[tuple[str, str], ...] = ()
    # Boots a real systemd as PID 1 (tests/bench/systemd_host.py) instead of sshd.
    systemd: bool = False
    # A member of the NAS's builder pool (``up --pool``): builds for it, is no push target.
    pool_member: bool = False

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        return f"{VETH_PREFIX}{self.name}"

    @property
    def dir(self) -> Path:
        return BENCH_DIR / "hosts" / self.name

    @property
    def home(self) -> str:
        return "/root" if self.user == "root" else f"/home/{self.user}"

    @property
    def ssh_control(self) -> Path:
        """The socket of the SSH connection testinfra's checks share (``client.on_host``)."""
        return SSH_CONTROL_DIR / f"{self.user}@{self.name}"

    @property
    def second_ip(self) -> str | None:
        """A second address of every host but the builder (its tailnet address, say): the
        first one plus 100 (``drop_address`` takes the first away)."""
        if self.name == BUILDER:
            return None
        network, last = self.ip.rsplit(".", 1)
        return f"{network}.{int(last) + 100}"

    @property
    def ips(self) -> tuple[str, ...]:
        """Every address of the host, the first one first."""
        return (self.ip,) if self.second_ip is None else (self.ip, self.second_ip)

    @property
    def known_hosts_name(self) -> str:
        return self.ip if self.port == 22 else f"[{self.ip}]:{self.port}"

    @property
    def known_hosts_names(self) -> tuple[str, ...]:
        return tuple(ip if self.port == 22 else f"[{ip}]:{self.port}" for ip in self.ips)


PI_ROOTS = ("minimal", "common", "network")
DESKTOP_ROOTS = ("minimal", "common", "network", "main", "work")
BUILDER = "nas"
# The default fleet (``up`` without ``--pis``): what CI and the end-to-end tests use.
DEFAULT_PIS = 3  # pi4, pi5 and pis (systemd)
MAX_PIS = 64
# Where ``up`` records the fleet it brought up, so that every later command (and every
# process: pyinfra reading tests/bench/inventory.py, ``down``, ``status``) sees the same hosts.
FLEET_FILE = BENCH_DIR / "fleet.json"
_DEFAULT_HOSTS: tuple[BenchHost, ...] = (
    BenchHost(
        BUILDER,
        f"{SUBNET}.10",
        22,
        "root",
        "x86_64-linux",
        ("minimal", "common", "network", "main", "server"),
    ),
    # Like the owner's pi4: port 8023, user beau with passwordless sudo.
    BenchHost(
        "pi4",
        f"{SUBNET}.21",
        8023,
        "beau",
        "aarch64-linux",
        PI_ROOTS,
        nix_conf=("trusted-users = root beau",),
    ),
    # A second Pi whose deploy user is not trusted by its Nix daemon.
    BenchHost("pi5", f"{SUBNET}.22", 22, "ops", "aarch64-linux", PI_ROOTS),
    # A Pi whose PID 1 is a real systemd (systemctl, systemd-run, journal, timers). Three
    # letters like the others: pyinfra pads its output to the longest name, tests match it.
    BenchHost(
        "pis",
        f"{SUBNET}.23",
        8024,
        "beau",
        "aarch64-linux",
        PI_ROOTS,
        nix_conf=("trusted-users = root beau",),
        systemd=True,
    ),
)
# An x86_64 desktop like the owner's grill: built natively on the NAS, pushed like the Pis.
# Its deploy user is not trusted by its Nix: it takes only paths the NAS signed.
DESKTOP = BenchHost("pc1", f"{SUBNET}.25", 22, "beau", "x86_64-linux", DESKTOP_ROOTS)
# Deploy users of the extra Pis, in turn: (user, port, trusted by the Pi's Nix daemon). All
# have passwordless sudo; the untrusted one takes only paths signed by the builder.
_EXTRA_PI_ACCOUNTS = (("pi", 22, True), ("deploy", 2200, False), ("admin", 8023, True))


def _extra_pi(index: int) -> BenchHost:
    """Extra Pi number ``index`` (0 is pi6): every fourth one, from the first, is armv7l."""
    user, port, trusted = _EXTRA_PI_ACCOUNTS[index % len(_EXTRA_PI_ACCOUNTS)]
    return BenchHost(
        f"pi{6 + index}",
        f"{SUBNET}.{30 + index}",
        port + index if port == 2200 else port,
        user,
        "armv7l-linux" if index % 4 == 0 else "aarch64-linux",
        PI_ROOTS,
        nix_conf=(f"trusted-users = root {user}",) if trusted else (),
    )


# A second builder, a member of the NAS's builder pool (``up --pool``, tests/bench/
# pool_inventory.py): a stand-in for a spare Pi 5 that builds aarch64 "natively" (its Nix's
# `system` is aarch64-linux, as the Pis'; the kernel runs that code under QEMU, as for them).
# Its own store, sshd and nix-daemon; root, as the NAS. Three letters, as the others.
POOL_MEMBER = BenchHost(
    "bld", f"{SUBNET}.12", 22, "root", "aarch64-linux", ("minimal",), pool_member=True
)


def fleet_of(pis: int, pool: bool = False) -> tuple[BenchHost, ...]:
    """The NAS, ``pis`` Pis (pi4, pi5 and pis as in the default fleet, then pi6, pi7, ...), the
    desktop and, with ``pool``, the NAS's pool member."""
    if not 1 <= pis <= MAX_PIS:
        raise ValueError(f"a bench fleet has 1 to {MAX_PIS} Pis, not {pis}")
    defaults = _DEFAULT_HOSTS[: 1 + min(pis, DEFAULT_PIS)]
    members = (POOL_MEMBER,) if pool else ()
    return (*defaults, *(_extra_pi(i) for i in range(pis - DEFAULT_PIS)), DESKTOP, *members)


def _load_fleet() -> tuple[BenchHost, ...]:
    """The fleet ``up`` recorded in ``FLEET_FILE``, else the default fleet."""
    try:
        records = json.loads(FLEET_FILE.read_text())
    except FileNotFoundError:
        return fleet_of(DEFAULT_PIS)
    return tuple(
        BenchHost(
            **{
                **record,
                "roots": tuple(record["roots"]),
                "nix_conf": tuple(record["nix_conf"]),
                "sshd_options": tuple(tuple(pair) for pair in record["sshd_options"]),
            }
        )
        for record in records
    )


def _use_fleet(hosts: tuple[BenchHost, ...], *, save: bool) -> None:
    """Make ``hosts`` this process's fleet (``HOSTS``, ``PIS``); ``save`` records it."""
    global HOSTS, PIS, DESKTOPS, POOL
    HOSTS = hosts
    # The Pis: every target of an emulated system. The x86_64 targets besides the builder are
    # desktops. The builder deploys itself; its pool members are no targets.
    targets = [h for h in hosts if h.name != BUILDER and not h.pool_member]
    PIS = tuple(h for h in targets if h.system != "x86_64-linux")
    DESKTOPS = tuple(h for h in targets if h.system == "x86_64-linux")
    POOL = tuple(h for h in hosts if h.pool_member)
    if save:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        partial = FLEET_FILE.with_suffix(".json.partial")
        partial.write_text(json.dumps([asdict(h) for h in hosts], indent=1) + "\n")
        partial.replace(FLEET_FILE)


HOSTS: tuple[BenchHost, ...] = ()
PIS: tuple[BenchHost, ...] = ()
DESKTOPS: tuple[BenchHost, ...] = ()
POOL: tuple[BenchHost, ...] = ()
_use_fleet(_load_fleet(), save=False)


def host(name: str) -> BenchHost:
    for candidate in HOSTS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no bench host {name!r}; bench hosts: {', '.join(h.name for h in HOSTS)}")


# -- one seam for processes ------------------------------------------------------------


def run(
    args: Sequence[str | Path], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command on the controller, capturing its output."""
    return subprocess.run(
        [str(a) for a in args], check=check, text=True, capture_output=True, input=input
    )


def in_host(h: BenchHost, args: Sequence[str]) -> list[str]:
    """Argument list that runs ``args`` inside host ``h`` (all its namespaces)."""
    pid = init_pid(h)
    if pid is None:
        raise RuntimeError(f"bench host {h.name} is not running: python -m tests.bench up")
    return ["nsenter", "-t", str(pid), "-n", "-m", "-u", "-p", "--", *args]


# -- install ---------------------------------------------------------------------------


def install() -> None:
    """Install what the bench needs from Debian and register QEMU for aarch64 and armv7l."""
    need_apt = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
    for arch in BUSYBOX_ARCH.values():
        if arch == NATIVE_ARCH:
            continue
        if arch not in run(["dpkg", "--print-foreign-architectures"]).stdout.split():
            run(["dpkg", "--add-architecture", arch])
            need_apt.append("")  # force an update for the new architecture
    if need_apt or not _busybox_debs_present():
        # A stale mirror index for one architecture must not stop the rest.
        update = run(["apt-get", "update"], check=False)
        if update.returncode != 0:
            print(f"apt-get update reported errors (continuing): {update.stderr.strip()[-300:]}")
    packages = [p for p in need_apt if p]
    if packages:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True, env=env)
    _fetch_busybox()
    register_binfmt(tuple(QEMU_HANDLERS))


def _dpkg_installed(package: str) -> bool:
    out = run(["dpkg-query", "-W", "-f=${Status}", package], check=False).stdout
    return out.endswith("installed") and "not-installed" not in out


def _busybox_path(system: str) -> Path:
    return BENCH_DIR / "busybox" / system / "busybox"


def _busybox_debs_present() -> bool:
    return all(_busybox_path(s).exists() for s in BUSYBOX_ARCH)


def _fetch_busybox() -> None:
    for system, arch in BUSYBOX_ARCH.items():
        dest = _busybox_path(system)
        if dest.exists():
            continue
        work = BENCH_DIR / "busybox" / f"download-{arch}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        subprocess.run(
            ["apt-get", "download", f"busybox-static:{arch}"],
            check=True,
            cwd=work,
            capture_output=True,
        )
        (deb,) = work.glob("busybox-static_*.deb")
        run(["dpkg-deb", "-x", deb, work / "root"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "root" / "bin" / "busybox", dest)
        shutil.rmtree(work)


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# The home nixpush gives the NAS's nix-ssh account (pull builds) is under the machine's /var,
# which the hosts share: each host binds its own directory there (``_init_script``).
SHARED_VAR_LEFTOVER = Path("/var/lib/nix-ssh")
_OWN_VAR_DIR = "var-lib-nix-ssh"


def mount_binfmt_misc() -> None:
    if not (BINFMT_DIR / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR])


def register_binfmt(systems: Sequence[str]) -> None:
    """Register Debian's QEMU handlers for ``systems`` machine-wide (kernel-global)."""
    mount_binfmt_misc()
    for system in systems:
        handler = QEMU_HANDLERS[system]
        if (BINFMT_DIR / handler).exists():
            continue
        line = Path(f"/usr/lib/binfmt.d/{handler}.conf").read_text().strip()
        (BINFMT_DIR / "register").write_text(line)


def unregister_binfmt(systems: Sequence[str]) -> None:
    for system in systems:
        entry = BINFMT_DIR / QEMU_HANDLERS[system]
        if entry.exists():
            entry.write_text("-1")


def registered_binfmt() -> tuple[str, ...]:
    """The emulated systems whose QEMU handler is registered now."""
    return tuple(s for s, h in QEMU_HANDLERS.items() if (BINFMT_DIR / h).exists())


# -- bring-up --------------------------------------------------------------------------


def up(pis: int | None = None, max_sessions: int | None = None, pool: bool | None = None) -> None:
    """Bring the bench up; hosts already running are left as they are.

    ``pis``: how many Pis (default: the fleet ``up`` recorded last, else ``DEFAULT_PIS``);
    Pis beyond it are stopped. ``max_sessions``: the NAS's sshd ``MaxSessions`` (default: as
    recorded; the bench's own default is ``SSHD_DEFAULTS``'). ``pool``: the NAS's pool member
    (``POOL_MEMBER``) up or stopped (default: as recorded). Running hosts whose sshd_config
    changed reload it.
    """
    if not _busybox_debs_present() or not shutil.which("nix-daemon"):
        install()
    mount_binfmt_misc()
    register_binfmt(tuple(QEMU_HANDLERS))
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if pis is not None or pool is not None:
        count = pis if pis is not None else len(PIS)
        members = pool if pool is not None else bool(POOL)
        hosts = _keep_sshd_options(fleet_of(count, pool=members))
    else:
        hosts = HOSTS
    if max_sessions is not None:
        hosts = tuple(
            _with_sshd_option(h, "MaxSessions", str(max_sessions)) if h.name == BUILDER else h
            for h in hosts
        )
    for gone in {h.name for h in HOSTS} - {h.name for h in hosts}:
        _stop(host(gone))
    _use_fleet(hosts, save=True)
    _controller_key()
    _bridge()
    _install_stand_ins()
    write_flake()
    for h in HOSTS:
        sshd_changed = _prepare_host_dir(h)
        _network(h)
        if init_pid(h) is None:
            _start(h)
        elif sshd_changed:
            reload_sshd(h)
    for h in HOSTS:
        _wait_for_ssh(h)
    _forget_unemulated_systems()
    _write_known_hosts()
    _write_ssh_config()
    # The bench's age key and sops file (needs the virtualenv: imported here, not at the top,
    # so `install` runs on the system Python).
    from tests.bench import sops

    sops.ensure()


def _forget_unemulated_systems() -> None:
    """Remove the NAS's nixpush-managed ``/etc/binfmt.d`` file of each system no Pi of this
    fleet runs (an earlier, bigger fleet's armv7l): ``deploys/nas.py`` would otherwise take it
    for a stale handler of its own and unregister it, machine-wide, under every bench instance
    that still uses it. The handler stays registered (``up`` registers every one)."""
    wanted = {pi.system for pi in PIS}
    stale = [
        f"/etc/binfmt.d/{handler}.conf"
        for system, handler in QEMU_HANDLERS.items()
        if system not in wanted
    ]
    from operations.builder.binfmt import MANAGED_MARKER  # needs the virtualenv, as sops below

    script = (
        'mark=$1; shift; for f in "$@"; do '
        'if [ "$(head -n 1 "$f" 2>/dev/null)" = "$mark" ]; then rm -f "$f"; fi; done'
    )
    run(in_host(host(BUILDER), ["sh", "-c", script, "forget", MANAGED_MARKER, *stale]))


def _keep_sshd_options(hosts: tuple[BenchHost, ...]) -> tuple[BenchHost, ...]:
    """``hosts`` with the sshd options the same hosts have in the current fleet."""
    now = {h.name: h.sshd_options for h in HOSTS}
    return tuple(replace(h, sshd_options=now.get(h.name, ())) for h in hosts)


def _controller_key() -> None:
    key = BENCH_DIR / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nixpush-bench", "-f", key])


def _bridge() -> None:
    if run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


# The bench's stand-ins (tests/bench/standins/), where every host finds them: the boot loader
# and stage 2 its init runs (boot.sh), the reboot its data's ``reboot_command`` names, and a
# bootctl on its PATH (this directory is its /usr/local/sbin).
STAND_INS_DIR = BENCH_DIR / "bench-bin"
STAND_INS = {"boot.sh": "boot.sh", "reboot.sh": "bench-reboot", "bootctl.sh": "bootctl"}
REBOOT_STAND_IN = STAND_INS_DIR / "bench-reboot"
# What the reboot stand-in leaves in a host's /boot for its launcher (``_launch_script``).
REBOOT_REQUEST = "bench-reboot-requested"


def _install_stand_ins() -> None:
    STAND_INS_DIR.mkdir(parents=True, exist_ok=True)
    for source, name in STAND_INS.items():
        text = (Path(__file__).resolve().parent / "standins" / source).read_text()
        dest = STAND_INS_DIR / name
        if not dest.exists() or dest.read_text() != text:
            partial = dest.with_suffix(".partial")
            partial.write_text(text)
            partial.chmod(0o755)
            partial.replace(dest)


def _network(h: BenchHost) -> None:
    if h.netns not in _netns_list():
        run(["ip", "netns", "add", h.netns])
    if h.second_ip is not None and h.veth in _links():
        _second_address(h)
    if run(["ip", "link", "show", h.veth], check=False).returncode != 0:
        run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
        run(["ip", "link", "set", h.veth, "master", BRIDGE, "up"])
        ns = ["ip", "netns", "exec", h.netns]
        run([*ns, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
        # A fixed address per host: a host started again answers at the MAC the others
        # remember for its IP (a new random one left them sending to the old for seconds).
        run([*ns, "ip", "link", "set", "eth0", "address", _mac_of(h.ip)])
        run([*ns, "ip", "link", "set", "eth0", "up"])
        run([*ns, "ip", "link", "set", "lo", "up"])
        run([*ns, "ip", "route", "add", "default", "via", CONTROLLER_IP])
        if h.second_ip is not None:
            _second_address(h)


def _links() -> str:
    return run(["ip", "-o", "link", "show"]).stdout


def _second_address(h: BenchHost) -> None:
    """Give the host its second address (idempotent), the one a test reaches it by once its
    first is dropped (``drop_address``)."""
    assert h.second_ip is not None
    ns = ["ip", "netns", "exec", h.netns]
    if f" {h.second_ip}/" not in run([*ns, "ip", "-o", "addr", "show", "dev", "eth0"]).stdout:
        # Without promotion, removing the first address of the subnet removes the second too.
        run([*ns, "sysctl", "-q", "-w", "net.ipv4.conf.eth0.promote_secondaries=1"])
        run([*ns, "ip", "addr", "add", f"{h.second_ip}/24", "dev", "eth0"])


def drop_address(h: BenchHost, dropped: bool = True) -> None:
    """Take the host's first address away (a laptop away from its LAN: its tailnet address,
    ``second_ip``, still answers), or give it back. sshd stays bound to it meanwhile."""
    ns = ["ip", "netns", "exec", h.netns]
    present = f" {h.ip}/" in run([*ns, "ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    if dropped and present:
        run([*ns, "ip", "addr", "del", f"{h.ip}/24", "dev", "eth0"])
    elif not dropped and not present:
        run([*ns, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
    run([*ns, "ip", "route", "replace", "default", "via", CONTROLLER_IP])


def _mac_of(ip: str) -> str:
    """A locally administered unicast MAC made of the IPv4 address: 10.231.57.21 ->
    02:00:0a:e7:39:15."""
    return "02:00:" + ":".join(f"{int(octet):02x}" for octet in ip.split("."))


def _netns_list() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line]


NIX_CONF_BASE = (
    "# written by the nixpush bench",
    "sandbox = false",
    "build-users-group = nixbld",
    # Empty: no public cache here; otherwise every build waits on DNS retries.
    "substituters =",
    "experimental-features = nix-command flakes",
)


def nix_conf_text(h: BenchHost) -> str:
    """The nix.conf a bench host starts with (what ``up`` writes on a new host)."""
    return "\n".join((*NIX_CONF_BASE, f"system = {h.system}", *h.nix_conf)) + "\n"


def _prepare_host_dir(h: BenchHost) -> bool:
    """Lay out the host's own directories and files; True when its sshd_config changed."""
    for sub in ("nix", "etc-upper", "etc-work", "root", "home", "tmp", "boot", "ssh", _OWN_VAR_DIR):
        (h.dir / sub).mkdir(parents=True, exist_ok=True)
    (h.dir / "tmp").chmod(0o1777)
    (h.dir / "root").chmod(0o700)
    host_key = h.dir / "ssh" / "ssh_host_ed25519_key"
    if not host_key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", host_key])
    nix_conf = h.dir / "etc-upper" / "nix" / "nix.conf"
    if not nix_conf.exists():
        nix_conf.parent.mkdir(parents=True, exist_ok=True)
        nix_conf.write_text(nix_conf_text(h))
    if h.systemd:
        # Units there run nixpush-run from the bench's inventories: they need this bench.
        environment = {"NIXPUSH_BENCH_INSTANCE": str(INSTANCE), "NIXPUSH_BENCH_DIR": str(BENCH_DIR)}
        systemd_host.prepare(h, environment)
        script = systemd_host.init_script(h, BENCH_DIR, _account_script(h), host_guards(h))
        (h.dir / "init.sh").write_text(script)
    else:
        (h.dir / "init.sh").write_text(_init_script(h))
    (h.dir / "launch.sh").write_text(_launch_script(h))
    return write_sshd_config(h)


# The bench's sshd settings besides each host's address and key. ``MaxSessions`` (sessions
# per connection; OpenSSH's default is 10) is generous so that tests don't hit it by accident;
# ``set_sshd_option`` and ``up --max-sessions`` change it for a host.
SSHD_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("PidFile", "none"),
    ("UsePAM", "no"),
    ("PasswordAuthentication", "no"),
    ("KbdInteractiveAuthentication", "no"),
    ("PubkeyAuthentication", "yes"),
    ("PermitRootLogin", "prohibit-password"),
    ("AuthorizedKeysFile", ".ssh/authorized_keys"),
    ("ClientAliveInterval", "2"),
    ("ClientAliveCountMax", "3"),
    ("MaxStartups", "100:30:200"),
    ("MaxSessions", "50"),
    ("Subsystem", "sftp internal-sftp"),
    ("AcceptEnv", "LANG LC_*"),
)


def sshd_options(h: BenchHost) -> dict[str, str]:
    """The sshd settings of host ``h``: the bench's defaults with its own overrides."""
    return {**dict(SSHD_DEFAULTS), **dict(h.sshd_options)}


def sshd_config_text(h: BenchHost) -> str:
    options = sshd_options(h)
    lines = [
        f"Port {h.port}",
        *(f"ListenAddress {ip}" for ip in h.ips),
        f"HostKey {h.dir / 'ssh' / 'ssh_host_ed25519_key'}",
        *(f"{key} {value}" for key, value in options.items()),
    ]
    return "\n".join(lines) + "\n"


def write_sshd_config(h: BenchHost) -> bool:
    """Write the host's sshd_config; True when its content changed."""
    path = h.dir / "ssh" / "sshd_config"
    text = sshd_config_text(h)
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def set_sshd_option(h: BenchHost | str, option: str, value: str) -> BenchHost:
    """Set one sshd_config option of a host and make its running sshd use it.

    The fleet file records it, so a later ``up`` keeps it. Returns the updated host.
    ``set_sshd_option("nas", "MaxSessions", "2")``; restore with the value
    ``sshd_options(host("nas"))["MaxSessions"]`` had before.
    """
    updated = _with_sshd_option(host(h) if isinstance(h, str) else h, option, value)
    _use_fleet(tuple(updated if x.name == updated.name else x for x in HOSTS), save=True)
    if write_sshd_config(updated) and init_pid(updated) is not None:
        reload_sshd(updated)
    return updated


def _with_sshd_option(h: BenchHost, option: str, value: str) -> BenchHost:
    """``h`` with ``option`` set to ``value`` (the bench's default value records no override)."""
    kept = tuple((k, v) for k, v in h.sshd_options if k != option)
    if value != dict(SSHD_DEFAULTS).get(option):
        kept = (*kept, (option, value))
    return replace(h, sshd_options=kept)


def reload_sshd(h: BenchHost, timeout: float = 10.0) -> None:
    """Make the host's sshd read its sshd_config again, and wait until it listens anew.

    The host's init exec'd sshd, so sshd is PID 1 of the host's PID namespace: SIGHUP makes it
    re-exec itself (same PID) with the new configuration; connections open now keep the old
    one. The listening socket is new after the re-exec, which is how we know it happened.
    """
    pid = init_pid(h)
    if pid is None:
        raise RuntimeError(f"bench host {h.name} is not running: python -m tests.bench up")
    before = _listening_inode(pid, h.port)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _listening_inode(pid, h.port)
        if now is not None and now != before:
            return
        time.sleep(0.05)
    log = (h.dir / "init.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"sshd of bench host {h.name} did not come back after SIGHUP:\n{log}")


def _listening_inode(pid: int, port: int) -> str | None:
    """Inode of the TCP socket listening on ``port`` in the network namespace of ``pid``."""
    lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            return fields[9]
    return None


def _account_script(h: BenchHost) -> str:
    """Shell that creates the host's deploy user (sudo) and authorizes the controller's key."""
    pubkey = (BENCH_DIR / "id_ed25519.pub").read_text().strip()
    if h.user == "root":
        make_user = ""
    else:
        make_user = (
            f"id -u {h.user} >/dev/null 2>&1 || useradd -m -s /bin/bash -p '*' {h.user}\n"
            f"echo '{h.user} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{h.user}\n"
            f"chmod 0440 /etc/sudoers.d/{h.user}\n"
        )
        if h.systemd:
            # Debian's nix-daemon.socket admits group nix-users only.
            make_user += f"usermod -a -G nix-users {h.user}\n"
    return f"""{make_user}mkdir -p {h.home}/.ssh
echo '{pubkey}' > {h.home}/.ssh/authorized_keys
chown -R {h.user}: {h.home}/.ssh
chmod 0700 {h.home}/.ssh
chmod 0600 {h.home}/.ssh/authorized_keys"""


def host_guards(h: BenchHost) -> str:
    """Shell every host's init runs after its mounts: what keeps the machine safe from the host
    (besides its launcher's bounding set, ``_launch_script``), its identity, the bench's
    stand-ins, and the boot loader's choice (the system it boots, or it stays down)."""
    return f"""# sysrq's trigger would reach the machine's kernel (b reboots it): read-only here.
if [ -e /proc/sysrq-trigger ]; then
  mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
  mount -o remount,bind,ro /proc/sysrq-trigger
fi
# The bench's bootctl on PATH (and sudo's secure_path); the reboot stand-in checks this file.
mount --bind {STAND_INS_DIR} /usr/local/sbin
echo {h.name} > /etc/nixpush-bench-host
hostname {h.name}
echo {h.name} > /etc/hostname
printf '127.0.0.1 localhost\\n{h.ip} {h.name}\\n' > /etc/hosts
sh {STAND_INS_DIR / "boot.sh"} || exit 1"""


def _launch_script(h: BenchHost) -> str:
    """The host's launcher: in the host's network namespace, outside its PID namespace, it
    starts the init, and again when the reboot stand-in asked for it (a file in the host's
    /boot). Started without CAP_SYS_BOOT in its bounding set, so nothing of the host has it:
    reboot(2) fails with EPERM inside, whatever the command (a reboot(2) in a PID namespace
    would only end that namespace, yet it must not even be possible)."""
    d = h.dir
    # A systemd host also gets its own cgroup namespace (see systemd_host.start).
    cgroup = " --cgroup" if h.systemd else ""
    return f"""#!/bin/sh
# Launcher of bench host {h.name}.
while :; do
  rm -f {d}/boot/{REBOOT_REQUEST}
  unshare --mount --uts --pid --fork{cgroup} --mount-proc --propagation private \\
    sh {d}/init.sh || true
  [ -e {d}/boot/{REBOOT_REQUEST} ] || exit 0
  echo "launcher: {h.name} reboots"
done
"""


def _init_script(h: BenchHost) -> str:
    d = h.dir
    return f"""#!/bin/sh
# Init of bench host {h.name}: runs as PID 1 of its own namespaces.
set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-upper,workdir={d}/etc-work /etc
for dir in nix root home tmp boot; do mount --bind {d}/$dir /$dir; done
# /var is the machine's: the home nixpush makes a pull builder's account there is the host's own
# (bench instances side by side would otherwise authorize each other's keys, and remove them).
mkdir -p {SHARED_VAR_LEFTOVER}
mount --bind {d}/{_OWN_VAR_DIR} {SHARED_VAR_LEFTOVER}
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/sshd
{host_guards(h)}
{_account_script(h)}
setsid nix-daemon >>{d}/nix-daemon.log 2>&1 < /dev/null &
exec /usr/sbin/sshd -D -e -f {d}/ssh/sshd_config
"""


def launcher_argv(h: BenchHost) -> list[str]:
    """How the host is started: no CAP_SYS_BOOT from here down (the launcher, the host's init
    and all it starts)."""
    return [
        "ip", "netns", "exec", h.netns,
        "setpriv", "--bounding-set", "-sys_boot",
        "sh", str(h.dir / "launch.sh"),
    ]  # fmt: skip


def _start(h: BenchHost) -> None:
    argv = launcher_argv(h)
    if h.systemd:
        systemd_host.start(h, argv)
        return
    log = (h.dir / "init.log").open("ab")
    subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def init_pid(h: BenchHost) -> int | None:
    """PID (in the root namespace) of the host's init, i.e. its sshd, or None."""
    if h.netns not in _netns_list():
        return None
    for pid in _netns_pids(h.netns):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):  # it exited since it was listed
            continue
        # NSpid lists the PID in each nested PID namespace: init is "<root pid> 1".
        nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
        if nspid and len(nspid[0]) == 2 and nspid[0][1] == "1":
            return pid
    return None


def _netns_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split()]


def _wait_for_ssh(h: BenchHost, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if init_pid(h) is not None:
            try:
                with socket.create_connection((h.ip, h.port), timeout=1):
                    return
            except OSError:
                pass
        time.sleep(0.1)
    log = (h.dir / "init.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"bench host {h.name} did not start sshd on {h.ip}:{h.port}:\n{log}")


def _write_known_hosts() -> None:
    lines = []
    for h in HOSTS:
        key = (h.dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
        lines += [f"{name} {key[0]} {key[1]}" for name in h.known_hosts_names]
    (BENCH_DIR / "known_hosts").write_text("\n".join(lines) + "\n")


def _write_ssh_config() -> None:
    """Host aliases for ssh, testinfra and Nix's ssh-ng (whose URLs carry no port)."""
    blocks = [
        "\n".join(
            (
                f"Host {h.name}",
                f"  HostName {h.ip}",
                f"  Port {h.port}",
                f"  User {h.user}",
                f"  IdentityFile {BENCH_DIR / 'id_ed25519'}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {BENCH_DIR / 'known_hosts'}",
                "  StrictHostKeyChecking yes",
                "  ConnectTimeout 5",
                "  ServerAliveInterval 2",
                "  ServerAliveCountMax 3",
            )
        )
        for h in HOSTS
    ]
    (BENCH_DIR / "ssh_config").write_text("\n\n".join(blocks) + "\n")
    SSH_CONTROL_DIR.mkdir(exist_ok=True)


# -- the test flake --------------------------------------------------------------------

FLAKE_DIR = BENCH_DIR / "flake"
# Nix system -> the flake's directory of its busybox (flake.nix's ``busybox``).
BUSYBOX_DIRS = {"aarch64-linux": "aarch64", "armv7l-linux": "armv7l", "x86_64-linux": "x86_64"}
# A configuration's attributes in hosts.nix: system, version, failActivation,
# failDryActivation, padding, dtbs,
# failEval ("throw" or "missing"), failBuild, slowBuild (seconds, a string).
FlakeConfig = dict[str, str | bool]


def flake_ref() -> str:
    return f"path:{FLAKE_DIR}"


def write_flake(configs: dict[str, FlakeConfig] | None = None) -> None:
    """Lay out the test flake with the busyboxes and a hosts.nix for ``configs``.

    ``configs`` maps configuration name to attributes (``system``, ``version``, ``padding``
    and the failure knobs of switch-to-configuration.sh: ``failActivation``,
    ``failDryActivation``, ``slowActivation`` (seconds, a string), ``breakNetwork``,
    ``breakSsh``); by default every Pi at version 1.
    """
    FLAKE_DIR.mkdir(parents=True, exist_ok=True)
    for item in FLAKE_TEMPLATE.iterdir():
        if item.is_dir():  # the shared library
            shutil.copytree(item, FLAKE_DIR / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, FLAKE_DIR / item.name)
    for system, arch_dir in BUSYBOX_DIRS.items():
        dest = FLAKE_DIR / "bb" / arch_dir / "busybox"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_busybox_path(system), dest)
    if configs is None:
        # Keep what is there (tests bump versions); add the fleet's Pis it lacks.
        existing = flake_configs()
        defaults: dict[str, FlakeConfig] = {
            h.name: {"system": h.system, "version": "1"} for h in HOSTS if not h.pool_member
        }
        defaults["armv7"] = {"system": "armv7l-linux", "version": "1"}
        configs = {**defaults, **existing}
        if configs == existing:
            return
    set_flake_configs(configs)


LIBRARY_WEIGHTS = ("light", "heavy")


def set_library_weight(weight: str) -> None:
    """How heavy the shared library every configuration imports is to evaluate: ``light``
    (the default: CI runs many deploys) or ``heavy`` (about a second of CPU and over 100 MB
    in one ``nix eval``: the perf harness, the batched-evaluation tests)."""
    if weight not in LIBRARY_WEIGHTS:
        raise ValueError(f"library weight {weight!r}: use one of {', '.join(LIBRARY_WEIGHTS)}")
    (FLAKE_DIR / "library-weight.nix").write_text(f'"{weight}"\n')


def library_weight() -> str:
    path = FLAKE_DIR / "library-weight.nix"
    return path.read_text().strip().strip('"') if path.exists() else "light"


_HOSTS_NIX_LINE = re.compile(r"^\s*([\w-]+) = \{ (.*) \};$")
_HOSTS_NIX_ATTR = re.compile(r'(\w+) = ("(?:[^"\\]|\\.)*"|true|false);')


def flake_configs() -> dict[str, FlakeConfig]:
    """What hosts.nix says each configuration is (as ``set_flake_configs`` wrote it)."""
    path = FLAKE_DIR / "hosts.nix"
    if not path.exists():
        return {}
    configs: dict[str, FlakeConfig] = {}
    for line in path.read_text().splitlines():
        match = _HOSTS_NIX_LINE.match(line)
        if match is None:
            continue
        attrs: FlakeConfig = {}
        for key, value in _HOSTS_NIX_ATTR.findall(match.group(2)):
            if value.startswith('"'):
                attrs[key] = re.sub(r"\\(.)", r"\1", value[1:-1])
            else:
                attrs[key] = value == "true"
        configs[match.group(1)] = attrs
    return configs


def set_flake_configs(configs: dict[str, FlakeConfig]) -> None:
    """Rewrite hosts.nix: what each nixosConfigurations.<name> is."""

    def value(v: str | bool) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'

    body = "".join(
        f"  {name} = {{ "
        + " ".join(f"{k} = {value(v)};" for k, v in sorted(attrs.items()))
        + " };\n"
        for name, attrs in sorted(configs.items())
    )
    (FLAKE_DIR / "hosts.nix").write_text("{\n" + body + "}\n")


# -- teardown and status ---------------------------------------------------------------


def down(purge: bool = False) -> None:
    """Stop every bench host (by PID), remove namespaces and links; ``purge`` deletes state.

    The fleet file stays (without ``purge``), so ``up`` brings the same fleet back.
    """
    for h in HOSTS:
        _stop(h)
    # A host of a fleet no longer recorded (say, the fleet file was deleted by hand).
    for netns in _netns_list():
        if netns.startswith(NETNS_PREFIX):
            _remove_netns(netns)
    if run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        run(["ip", "link", "del", BRIDGE])
    if purge:
        if BENCH_DIR.exists():
            shutil.rmtree(BENCH_DIR)
        _remove_shared_var_leftover()
        _use_fleet(fleet_of(DEFAULT_PIS), save=False)


def _remove_shared_var_leftover() -> None:
    """Empty ``SHARED_VAR_LEFTOVER`` (what benches before the hosts' own directory wrote there),
    and remove it unless a bench host, of any instance, runs: removing it would unmount that
    host's own directory."""
    if not SHARED_VAR_LEFTOVER.is_dir():
        return
    for item in SHARED_VAR_LEFTOVER.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    if not any(re.match(r"np\d?-", netns) for netns in _netns_list()):
        SHARED_VAR_LEFTOVER.rmdir()


def _stop(h: BenchHost) -> None:
    """Stop one host: its processes (by PID), its namespace and its link."""
    # A reboot asked for just now must not start it again behind our back.
    (h.dir / "boot" / REBOOT_REQUEST).unlink(missing_ok=True)
    if h.systemd:
        systemd_host.stop(h, init_pid(h))
    _remove_netns(h.netns)
    # Checks after a restart get a new connection, not the one to the host that was.
    h.ssh_control.unlink(missing_ok=True)
    if run(["ip", "link", "show", h.veth], check=False).returncode == 0:
        run(["ip", "link", "del", h.veth], check=False)


def _remove_netns(netns: str) -> None:
    if netns in _netns_list():
        _kill_pids(_netns_pids(netns))
        run(["ip", "netns", "del", netns], check=False)


def _kill_pids(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(_exited(p) for p in pids):
            time.sleep(0.05)


def _exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie: a host's launcher this process started stays one
    until reaped (waiting for it to vanish cost 10 s a host, SIGTERM's and SIGKILL's waits)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # the state, after "pid (name)"


def leftovers() -> list[str]:
    """Anything of the bench still on the machine: namespaces, links, processes, mounts."""
    found = [f"netns {n}" for n in _netns_list() if n.startswith(NETNS_PREFIX)]
    links = run(["ip", "-o", "link", "show"]).stdout
    found += [f"link {BRIDGE}" for line in links.splitlines() if f": {BRIDGE}:" in line]
    # Any host's link, recorded in the fleet file or not.
    found += [
        f"link {line.split(': ')[1].split('@')[0]}"
        for line in links.splitlines()
        if f": {VETH_PREFIX}" in line
    ]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f"{BENCH_DIR / 'hosts'}/".encode() in cmdline:
            found.append(f"process {proc.name}: {cmdline.decode(errors='replace').strip()}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if f"{BENCH_DIR}/" in line]
    found += systemd_host.leftover_cgroups(NETNS_PREFIX)
    return found


def status() -> dict[str, str]:
    result = {}
    for h in HOSTS:
        pid = init_pid(h)
        if pid is None:
            result[h.name] = "down"
            continue
        try:
            with socket.create_connection((h.ip, h.port), timeout=1):
                result[h.name] = f"up (init pid {pid}, ssh {h.user}@{h.ip}:{h.port})"
        except OSError:
            result[h.name] = f"starting (init pid {pid})"
    return result


def set_link(h: BenchHost, up: bool) -> None:
    """Cut or restore a host's link, from inside its namespace."""
    run(["ip", "netns", "exec", h.netns, "ip", "link", "set", "eth0", "up" if up else "down"])


def wait_until_up(h: BenchHost, timeout: float = 60.0, *, other_than: int | None = None) -> int:
    """Wait until the host's init (another one than ``other_than``: it rebooted) runs and its
    sshd answers on its first address; its init's PID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = init_pid(h)
        if pid is not None and pid != other_than:
            try:
                with socket.create_connection((h.ip, h.port), timeout=1):
                    h.ssh_control.unlink(missing_ok=True)  # the connection to the host that was
                    return pid
            except OSError:
                pass
        time.sleep(0.2)
    log = (h.dir / "init.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"bench host {h.name} did not come up in {timeout:.0f}s:\n{log}")


def is_down(h: BenchHost) -> bool:
    """True when the host's init is gone and its launcher ended (it stays down until ``up``)."""
    return init_pid(h) is None and not any(
        b"launch.sh" in Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in _netns_pids(h.netns)
        if Path(f"/proc/{pid}/cmdline").exists()
    )


def manual_switch(h: BenchHost, system: str) -> None:
    """What the owner's ``nixos-rebuild switch`` (or ``just deploy-pi4``) does on the host,
    without nixpush: ``system`` (already in its store) becomes the profile's new generation,
    the boot default and the running system."""
    script = (
        'nix-env -p /nix/var/nix/profiles/system --set "$1" && '
        '"$1/bin/switch-to-configuration" switch'
    )
    run(in_host(h, ["sh", "-c", script, "manual-switch", system]))
