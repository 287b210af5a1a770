"""The bench's binary cache: what a target with ``substitute_on_target`` fetches from.

A Nix binary cache directory (``nix copy --to file://...``, every path signed with a key of the
cache's own) served over HTTP by ``python3 -m http.server`` in a network namespace of its own on
the bench bridge, bound to the cache's bench address only (nothing leaves the machine). A
target uses it once ``trust`` added it to its nix.conf (``extra-substituters``,
``extra-trusted-public-keys``) and restarted its daemon; ``untrust`` takes that out again. The
server's request log (``LOG``) says which paths were fetched; the cache's link counters
(``sent_bytes``) how many bytes it served. ``fleet.down`` stops it with the other namespaces.

Command line: ``python -m tests.bench cache up|down|status``.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from operations.builder.nix import restart_daemon
from tests.bench import fleet

NAME = "cache"
IP = f"{fleet.SUBNET}.14"
PORT = 8080
URL = f"http://{IP}:{PORT}"
NETNS = f"{fleet.NETNS_PREFIX}{NAME}"
VETH = f"{fleet.VETH_PREFIX}{NAME}"
DIR = fleet.BENCH_DIR / "cache"
STORE = DIR / "store"
SECRET_KEY = DIR / "cache-key.sec"
PUBLIC_KEY = DIR / "cache-key.pub"
LOG = DIR / "http.log"
KEY_NAME = f"nixpush-bench-{fleet.INSTANCE}-cache-1"
# Marks the lines trust() adds to a target's nix.conf, so untrust() removes only those.
MARK = "# nixpush bench cache"
NIX = ("nix", "--extra-experimental-features", "nix-command")


def up() -> None:
    """The cache's key, directory, namespace and server (idempotent)."""
    DIR.mkdir(parents=True, exist_ok=True)
    STORE.mkdir(exist_ok=True)
    # What a substituter reads first (``nix copy --to file://`` writes it too, but a target may
    # ask before anything was copied there).
    info = STORE / "nix-cache-info"
    if not info.exists():
        info.write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
    if not SECRET_KEY.exists():
        fleet.run(["nix-store", "--generate-binary-cache-key", KEY_NAME, SECRET_KEY, PUBLIC_KEY])
        SECRET_KEY.chmod(0o600)
    _network()
    if not running():
        log = LOG.open("ab")
        argv = [
            "ip", "netns", "exec", NETNS, "/usr/bin/python3", "-m", "http.server",
            "--bind", IP, "--directory", str(STORE), str(PORT),
        ]  # fmt: skip
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        _wait_until_serving()


def down() -> None:
    """Stop the server (by the namespace's PIDs) and remove the namespace and its link."""
    fleet._remove_netns(NETNS)
    if fleet.run(["ip", "link", "show", VETH], check=False).returncode == 0:
        fleet.run(["ip", "link", "del", VETH], check=False)


def running() -> bool:
    return NETNS in fleet._netns_list() and bool(fleet._netns_pids(NETNS))


def public_key() -> str:
    return PUBLIC_KEY.read_text().strip()


def _network() -> None:
    if NETNS not in fleet._netns_list():
        fleet.run(["ip", "netns", "add", NETNS])
    if fleet.run(["ip", "link", "show", VETH], check=False).returncode != 0:
        peer = ["peer", "name", "eth0", "netns", NETNS]
        fleet.run(["ip", "link", "add", VETH, "type", "veth", *peer])
        fleet.run(["ip", "link", "set", VETH, "master", fleet.BRIDGE, "up"])
        ns = ["ip", "netns", "exec", NETNS]
        fleet.run([*ns, "ip", "addr", "add", f"{IP}/24", "dev", "eth0"])
        fleet.run([*ns, "ip", "link", "set", "eth0", "up"])
        fleet.run([*ns, "ip", "link", "set", "lo", "up"])


def _wait_until_serving(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = fleet.run(["curl", "-sf", "-o", "/dev/null", f"{URL}/"], check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the bench cache does not answer at {URL}:\n{LOG.read_text()[-2000:]}")


def fill(paths: Sequence[str], source: str = fleet.BUILDER) -> None:
    """Put ``paths`` (not their closure) from ``source``'s store in the cache, signed with the
    cache's key, uncompressed (the bench's blobs are random bytes)."""
    to = f"file://{STORE}?secret-key={SECRET_KEY}&compression=none"
    fleet.run(
        ["env", f"NIX_SSHOPTS=-F {fleet.BENCH_DIR / 'ssh_config'}", *NIX, "copy",
         "--no-recursive", "--from", f"ssh-ng://{source}", "--to", to, *paths],
    )  # fmt: skip


def fetched() -> list[str]:
    """The NAR files served so far (the request log's ``GET /nar/...`` lines)."""
    if not LOG.exists():
        return []
    return [line for line in LOG.read_text().splitlines() if '"GET /nar/' in line]


def sent_bytes(veth: str = VETH) -> int:
    """Bytes sent from a bench namespace so far: what its link's bridge end received."""
    return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())


def _as_root(h: fleet.BenchHost, script: str) -> None:
    from tests.bench.client import ssh

    sudo = "" if h.user == "root" else "sudo "
    ssh(h.name, f"{sudo}sh -c {shlex.quote(script)}")


def trust(h: fleet.BenchHost) -> None:
    """Make ``h``'s Nix use the cache as a substituter (and trust its key), as a target's own
    nix.conf would list cache.nixos.org, and restart its daemon so it reads that."""
    lines = f"{MARK}\nextra-substituters = {URL}\nextra-trusted-public-keys = {public_key()}"
    _as_root(
        h,
        f"grep -qF {shlex.quote(MARK)} /etc/nix/nix.conf || "
        f"printf '%s\\n' {shlex.quote(lines)} >> /etc/nix/nix.conf; "
        + restart_daemon(h.systemd).get_raw_value(),
    )


def untrust(h: fleet.BenchHost) -> None:
    """Take the cache out of ``h``'s nix.conf again and restart its daemon. Word by word: a
    deploy meanwhile may have added the builder's key to the same ``extra-trusted-public-keys``
    line (``nix.trusted_public_key`` extends the line it finds)."""
    sed = [
        f"/^{MARK}$/d",
        f"\\|^extra-substituters = {URL}$|d",
        f"s| *{public_key()}||",
        "/^extra-trusted-public-keys = *$/d",
    ]
    script = " ".join(f"-e {shlex.quote(expression)}" for expression in sed)
    _as_root(h, f"sed -i {script} /etc/nix/nix.conf; " + restart_daemon(h.systemd).get_raw_value())
