"""The bench fleet: NixOS-like hosts on this one machine, for nixpush's tests and demo.

Each host is a network namespace joined to a bridge, with its own mount, UTS and PID
namespaces in which ``/etc`` is an overlay of the machine's, and ``/nix``, ``/root``,
``/home``, ``/tmp`` and ``/boot`` are the host's own directories. Its init starts a
nix-daemon, then becomes the host's sshd, so every SSH session lands inside the host.
The controller (where pyinfra runs) is the root namespace, on the bridge.

Command line: ``python -m tests.bench install|up|down|status|env``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
)
# Static busybox per emulated Nix system, from Debian's packages.
BUSYBOX_ARCH = {"aarch64-linux": "arm64", "armv7l-linux": "armhf"}
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

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        return f"npv{INSTANCE or ''}-{self.name}"

    @property
    def dir(self) -> Path:
        return BENCH_DIR / "hosts" / self.name

    @property
    def home(self) -> str:
        return "/root" if self.user == "root" else f"/home/{self.user}"

    @property
    def known_hosts_name(self) -> str:
        return self.ip if self.port == 22 else f"[{self.ip}]:{self.port}"


PI_ROOTS = ("minimal", "common", "network")
HOSTS: tuple[BenchHost, ...] = (
    BenchHost(
        "nas",
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
)
PIS = tuple(h for h in HOSTS if h.name.startswith("pi"))


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
SHARED_VAR_LEFTOVER = Path("/var/lib/nix-ssh")


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


def up() -> None:
    """Bring the whole bench up; hosts already running are left as they are."""
    if not _busybox_debs_present() or not shutil.which("nix-daemon"):
        install()
    mount_binfmt_misc()
    register_binfmt(tuple(QEMU_HANDLERS))
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    _controller_key()
    _bridge()
    write_flake()
    for h in HOSTS:
        _prepare_host_dir(h)
        _network(h)
        if init_pid(h) is None:
            _start(h)
    for h in HOSTS:
        _wait_for_ssh(h)
    _write_known_hosts()
    _write_ssh_config()
    # The bench's age key and sops file (needs the virtualenv: imported here, not at the top,
    # so `install` runs on the system Python).
    from tests.bench import sops

    sops.ensure()


def _controller_key() -> None:
    key = BENCH_DIR / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nixpush-bench", "-f", key])


def _bridge() -> None:
    if run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def _network(h: BenchHost) -> None:
    if h.netns not in _netns_list():
        run(["ip", "netns", "add", h.netns])
    if run(["ip", "link", "show", h.veth], check=False).returncode != 0:
        run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
        run(["ip", "link", "set", h.veth, "master", BRIDGE, "up"])
        ns = ["ip", "netns", "exec", h.netns]
        run([*ns, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
        run([*ns, "ip", "link", "set", "eth0", "up"])
        run([*ns, "ip", "link", "set", "lo", "up"])
        run([*ns, "ip", "route", "add", "default", "via", CONTROLLER_IP])


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


def _prepare_host_dir(h: BenchHost) -> None:
    for sub in ("nix", "etc-upper", "etc-work", "root", "home", "tmp", "boot", "ssh"):
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
    (h.dir / "ssh" / "sshd_config").write_text(
        "\n".join(
            (
                f"Port {h.port}",
                f"ListenAddress {h.ip}",
                f"HostKey {host_key}",
                "PidFile none",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "AuthorizedKeysFile .ssh/authorized_keys",
                "ClientAliveInterval 2",
                "ClientAliveCountMax 3",
                "MaxStartups 100:30:200",
                "MaxSessions 50",
                "Subsystem sftp internal-sftp",
                "AcceptEnv LANG LC_*",
                "",
            )
        )
    )
    (h.dir / "init.sh").write_text(_init_script(h))


def _init_script(h: BenchHost) -> str:
    d = h.dir
    pubkey = (BENCH_DIR / "id_ed25519.pub").read_text().strip()
    if h.user == "root":
        make_user = ""
    else:
        make_user = (
            f"id -u {h.user} >/dev/null 2>&1 || useradd -m -s /bin/bash -p '*' {h.user}\n"
            f"echo '{h.user} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{h.user}\n"
            f"chmod 0440 /etc/sudoers.d/{h.user}\n"
        )
    return f"""#!/bin/sh
# Init of bench host {h.name}: runs as PID 1 of its own namespaces.
set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-upper,workdir={d}/etc-work /etc
for dir in nix root home tmp boot; do mount --bind {d}/$dir /$dir; done
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/sshd
hostname {h.name}
echo {h.name} > /etc/hostname
printf '127.0.0.1 localhost\\n{h.ip} {h.name}\\n' > /etc/hosts
{make_user}mkdir -p {h.home}/.ssh
echo '{pubkey}' > {h.home}/.ssh/authorized_keys
chown -R {h.user}: {h.home}/.ssh
chmod 0700 {h.home}/.ssh
chmod 0600 {h.home}/.ssh/authorized_keys
setsid nix-daemon >>{d}/nix-daemon.log 2>&1 < /dev/null &
exec /usr/sbin/sshd -D -e -f {d}/ssh/sshd_config
"""


def _start(h: BenchHost) -> None:
    log = (h.dir / "init.log").open("ab")
    subprocess.Popen(
        [
            "ip", "netns", "exec", h.netns,
            "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
            "--propagation", "private",
            "sh", str(h.dir / "init.sh"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )  # fmt: skip


def init_pid(h: BenchHost) -> int | None:
    """PID (in the root namespace) of the host's init, i.e. its sshd, or None."""
    if h.netns not in _netns_list():
        return None
    for pid in _netns_pids(h):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        # NSpid lists the PID in each nested PID namespace: init is "<root pid> 1".
        nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
        if nspid and len(nspid[0]) == 2 and nspid[0][1] == "1":
            return pid
    return None


def _netns_pids(h: BenchHost) -> list[int]:
    out = run(["ip", "netns", "pids", h.netns], check=False).stdout
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
        lines.append(f"{h.known_hosts_name} {key[0]} {key[1]}")
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


# -- the test flake --------------------------------------------------------------------

FLAKE_DIR = BENCH_DIR / "flake"


def flake_ref() -> str:
    return f"path:{FLAKE_DIR}"


def write_flake(configs: dict[str, dict[str, str | bool]] | None = None) -> None:
    """Lay out the test flake with the busyboxes and a hosts.nix for ``configs``.

    ``configs`` maps configuration name to attributes (``system``, ``version``, ``padding``
    and the failure knobs of switch-to-configuration.sh: ``failActivation``,
    ``slowActivation`` (seconds, a string), ``breakNetwork``, ``breakSsh``); by default every
    Pi at version 1.
    """
    FLAKE_DIR.mkdir(parents=True, exist_ok=True)
    for item in FLAKE_TEMPLATE.iterdir():
        shutil.copy2(item, FLAKE_DIR / item.name)
    for system, arch_dir in (("aarch64-linux", "aarch64"), ("armv7l-linux", "armv7l")):
        dest = FLAKE_DIR / "bb" / arch_dir / "busybox"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_busybox_path(system), dest)
    if configs is None:
        if (FLAKE_DIR / "hosts.nix").exists():
            return
        configs = {h.name: {"system": h.system, "version": "1"} for h in PIS}
        configs["armv7"] = {"system": "armv7l-linux", "version": "1"}
    set_flake_configs(configs)


def set_flake_configs(configs: dict[str, dict[str, str | bool]]) -> None:
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
    """Stop every bench host (by PID), remove namespaces and links; ``purge`` deletes state."""
    for h in HOSTS:
        if h.netns in _netns_list():
            _kill_pids(_netns_pids(h))
            run(["ip", "netns", "del", h.netns], check=False)
        if run(["ip", "link", "show", h.veth], check=False).returncode == 0:
            run(["ip", "link", "del", h.veth], check=False)
    if run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        run(["ip", "link", "del", BRIDGE])
    if purge:
        if BENCH_DIR.exists():
            shutil.rmtree(BENCH_DIR)
        # /var is the machine's, shared by the hosts: the home nixpush gives the NAS's
        # nix-ssh user (pull builds) lands there.
        shutil.rmtree(SHARED_VAR_LEFTOVER, ignore_errors=True)


def _kill_pids(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.05)


def leftovers() -> list[str]:
    """Anything of the bench still on the machine: namespaces, links, processes, mounts."""
    found = [f"netns {n}" for n in _netns_list() if n.startswith(NETNS_PREFIX)]
    links = run(["ip", "-o", "link", "show"]).stdout
    found += [f"link {BRIDGE}" for line in links.splitlines() if f": {BRIDGE}:" in line]
    found += [
        f"link {h.veth}" for h in HOSTS for line in links.splitlines() if f": {h.veth}@" in line
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
