"""
Pull builds on the bench: after `deploys/nas.py`, `deploys/secrets.py` and `deploys/pull.py`
(with the bench's pull inventory), a build started on a Pi runs on the NAS through Nix's own
remote-build protocol; checked with real builds and ssh on the hosts.

Each build is of a configuration no store holds yet (a private copy of the bench flake with a
fresh version, under the bench directory, which both hosts see), so it must really be built,
and `--max-jobs 0` forbids building it on the Pi.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from operations.builder.pull import MACHINES_FILE, PULL_KEY_PATH, builder_alias, pulling_targets
from operations.data.fleet import check_fleet
from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import pyinfra, ssh
from tests.unit.conftest import REPO, load_inventory

INVENTORY = "tests/bench/pull_inventory.py"
DEPLOYS = ("deploys/nas.py", "deploys/secrets.py", "deploys/pull.py")
FLAKE_DIR = fleet.BENCH_DIR / "e2e-pull" / "flake"
timings: dict[str, float] = {}


def run_deploy(deploy: str, *args: str) -> str:
    started = time.monotonic()
    result = pyinfra("-y", *args, INVENTORY, deploy, env=bench_sops.env())
    timings[f"{deploy} {' '.join(args)}".strip()] = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def grand_total(output: str) -> tuple[str, ...]:
    match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    assert match, output[-2000:]
    return match.groups()


@pytest.fixture(scope="module")
def pull_ready(bench: None) -> Iterator[tuple[str, str]]:
    """The three deploys run once; (a pulling Pi, its builder) from the inventory."""
    bench_sops.ensure()
    specs = check_fleet(load_inventory(REPO / INVENTORY, REPO))
    builder = next(name for name in specs if pulling_targets(specs, name))
    pi = next(t.name for t in pulling_targets(specs, builder) if t.nix_system == "aarch64-linux")
    for deploy in DEPLOYS:
        run_deploy(deploy)
    yield pi, builder
    print(f"\npull deploy timings: {json.dumps({k: round(v, 2) for k, v in timings.items()})}")


@pytest.fixture
def fresh_flake(bench: None) -> Iterator[str]:
    """A copy of the bench flake whose configurations are built nowhere yet."""
    shutil.rmtree(FLAKE_DIR.parent, ignore_errors=True)
    shutil.copytree(fleet.FLAKE_TEMPLATE, FLAKE_DIR)
    (FLAKE_DIR / "bb" / "aarch64").mkdir(parents=True)
    shutil.copy2(
        fleet.BENCH_DIR / "busybox" / "aarch64-linux" / "busybox",
        FLAKE_DIR / "bb" / "aarch64" / "busybox",
    )
    version = f"pull-{uuid.uuid4().hex[:12]}"
    (FLAKE_DIR / "hosts.nix").write_text(
        "{\n"
        + "".join(
            f'  {name} = {{ system = "aarch64-linux"; version = "{version}-{name}"; }};\n'
            for name in ("first", "second")
        )
        + "}\n"
    )
    yield f"path:{FLAKE_DIR}"
    shutil.rmtree(FLAKE_DIR.parent, ignore_errors=True)


def toplevel(flake: str, config: str) -> str:
    return f"{flake}#nixosConfigurations.{config}.config.system.build.toplevel"


def out_path(host: str, attr: str) -> str:
    path = ssh(host, f"sudo nix eval --raw '{attr}.outPath'").stdout.strip()
    assert path.startswith("/nix/store/"), path
    return path


def in_store(host: str, path: str) -> bool:
    return ssh(host, f"nix path-info {path} >/dev/null 2>&1", check=False).returncode == 0


def pi_build(pi: str, attr: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`nix build` on the Pi as root, never locally (--max-jobs 0)."""
    command = " ".join(("sudo nix build --max-jobs 0 --no-link --json", *options, f"'{attr}'"))
    return ssh(pi, command, check=False)


def test_a_build_started_on_the_pi_runs_on_the_nas_as_aarch64(pull_ready, fresh_flake):
    pi, builder = pull_ready
    attr = toplevel(fresh_flake, "first")
    path = out_path(pi, attr)
    assert not in_store(pi, path) and not in_store(builder, path)  # really cold

    started = time.monotonic()
    result = pi_build(pi, attr)
    timings["remote build"] = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["outputs"]["out"] == path
    assert f"on 'ssh-ng://nix-ssh@{builder_alias(builder)}'" in result.stderr
    assert in_store(pi, path)  # copied back
    assert in_store(builder, path)  # built there
    assert ssh(pi, f"cat {path}/build-arch").stdout.strip() == "aarch64"
    assert ssh(builder, f"cat {path}/build-arch").stdout.strip() == "aarch64"


def test_a_builder_with_another_host_key_is_refused(pull_ready, fresh_flake):
    pi, builder = pull_ready
    attr = toplevel(fresh_flake, "second")
    path = out_path(pi, attr)
    line = ssh(pi, f"sudo cat {MACHINES_FILE}").stdout.split("\n")[0].split()
    assert len(line) == 8
    # The Pi's own host key stands in for an impostor's.
    impostor = (fleet.host(pi).dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    line[7] = base64.b64encode(" ".join(impostor).encode()).decode()

    result = pi_build(pi, attr, "--builders", f"'{' '.join(line)}'")

    assert result.returncode != 0
    assert "Host key verification failed" in result.stderr, result.stderr
    assert not in_store(builder, path) and not in_store(pi, path)


# The bench's known_hosts (the machine's /var is shared with the hosts): the probes verify the
# NAS's host key like everything else here.
KNOWN_HOSTS = str(fleet.BENCH_DIR / "known_hosts")

PROBE = """
import struct, subprocess, sys
ssh = ["ssh", "-i", sys.argv[1], "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
       "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" + sys.argv[3],
       "-o", "LogLevel=ERROR", sys.argv[2], "echo shell-ran; touch /tmp/pull-shell-ran"]
probe = subprocess.Popen(ssh, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
probe.stdin.write(struct.pack("<Q", 0x6E697863))  # Nix's WORKER_MAGIC_1
probe.stdin.flush()
print(probe.stdout.read(8).hex())
probe.stdin.close()
probe.wait()
"""


def test_the_pull_key_gets_the_nix_daemon_never_a_shell(pull_ready):
    pi, builder = pull_ready
    nas = fleet.host(builder)
    target = f"nix-ssh@{nas.ip}"
    # The client's command is ignored: the answer is the Nix daemon's handshake.
    result = subprocess.run(
        ["ssh", "-F", str(fleet.BENCH_DIR / "ssh_config"), pi, "sudo", "python3", "-",
         PULL_KEY_PATH, target, KNOWN_HOSTS],
        input=PROBE, text=True, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert bytes.fromhex(result.stdout.strip())[:4] == b"oixd"  # WORKER_MAGIC_2
    assert "shell-ran" not in result.stdout
    assert not Path(f"{nas.dir}/tmp/pull-shell-ran").exists()

    plain = ssh(
        pi,
        f"sudo ssh -i {PULL_KEY_PATH} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={KNOWN_HOSTS} -o LogLevel=ERROR "
        f"{target} true </dev/null; echo rc=$?",
        check=False,
    )
    assert "rc=0" in plain.stdout  # the daemon saw EOF and exited: `true` never mattered
    pty = ssh(
        pi,
        f"sudo ssh -tt -i {PULL_KEY_PATH} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={KNOWN_HOSTS} {target} </dev/null",
        check=False,
    )
    assert "PTY allocation request failed" in pty.stderr


def test_dry_run_changes_nothing_and_a_real_run_repairs(pull_ready):
    pi, _ = pull_ready
    ssh(pi, f"sudo rm -f {MACHINES_FILE}")

    result = pyinfra("--dry", INVENTORY, "deploys/pull.py", env=bench_sops.env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    changes = output.split("--> Detected changes:")[1]
    assert re.search(rf"List \S+ in {MACHINES_FILE}\s+1 \({pi}\)", changes), changes
    assert ssh(pi, f"sudo test -e {MACHINES_FILE}", check=False).returncode != 0

    run_deploy("deploys/pull.py")
    assert ssh(pi, f"sudo test -s {MACHINES_FILE}", check=False).returncode == 0


def test_a_second_run_of_every_deploy_changes_nothing(pull_ready):
    for deploy in DEPLOYS:
        hosts, success, error, no_change = grand_total(run_deploy(deploy, "-v"))
        assert (success, error) == ("-", "-"), deploy
        assert no_change == hosts, deploy
