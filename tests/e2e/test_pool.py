"""
The NAS's builder pool on the bench: the member ``bld`` (its own store, sshd and nix-daemon; a
stand-in for a native aarch64 machine) prepared by ``deploys/nas.py`` with the pool inventory,
then push deploys whose aarch64 builds Nix's build hook sends to it: its store holds the
outputs, and the run names it. With the NAS's ``max-jobs = 0`` the pool is the only way to
build; with the member down or impersonated, the NAS builds itself and the summary says why.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from operations.builder.nix import MACHINES_FILE
from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import prepare_push, pyinfra, ssh
from tests.e2e.test_pi import current, desired_path, new_versions

INVENTORY = "tests/bench/pool_inventory.py"
PLAIN = "tests/bench/inventory.py"
PI = "pi4"


def run(deploy: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return pyinfra("-y", INVENTORY, deploy, *args, env={**bench_sops.env(), **env})


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def prepare(**env: str) -> None:
    for deploy in ("deploys/secrets.py", "deploys/nas.py"):  # the pool key first
        result = run(deploy, **env)
        assert result.returncode == 0, output(result)[-3000:]


@pytest.fixture(scope="module")
def pool(bench: None) -> Iterator[fleet.BenchHost]:
    """The member up and both ends prepared; afterwards it is stopped and the NAS prepared
    with the plain inventory again, which takes the member's line out of its machines file."""
    fleet.up(pool=True)
    bench_sops.ensure()
    prepare_push()
    prepare()
    (member,) = fleet.POOL
    yield member
    fleet.up(pool=False)
    prepare_push()
    assert "nixpush-builder-bld" not in ssh("nas", f"cat {MACHINES_FILE} || true").stdout


def in_store(host: str, path: str) -> bool:
    return ssh(host, f"nix path-info {path} >/dev/null 2>&1", check=False).returncode == 0


def deploy_pi(**env: str) -> tuple[str, str]:
    """A new version of the Pi deployed with the pool inventory: (its toplevel, the output)."""
    new_versions(PI)
    path = desired_path(PI)
    assert not in_store("nas", path)  # really cold
    result = run("deploys/pi.py", "--limit", PI, **env)
    text = output(result)
    assert result.returncode == 0, text[-3000:]
    assert current(PI) == path
    return path, text


def test_both_ends_are_prepared_and_a_second_run_changes_nothing(pool):
    line = ssh("nas", f"cat {MACHINES_FILE}").stdout.strip().split()
    assert line[:6] == [
        "ssh-ng://nix-ssh@nixpush-builder-bld", "aarch64-linux", "/root/.ssh/nixpush_pool",
        "1", "4", "big-parallel",
    ]  # fmt: skip
    host_key = (pool.dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert base64.b64decode(line[7]).decode() == " ".join(host_key)
    assert "builders = @/etc/nix/machines" in ssh("nas", "cat /etc/nix/nix.conf").stdout
    keys = ssh(pool.name, "cat /var/lib/nix-ssh/.ssh/authorized_keys").stdout
    assert re.search(
        r'restrict,command="\S+nix-daemon --stdio" ssh-ed25519 \S+ nixpush-pull:nas', keys
    )
    assert "trusted-users = root nix-ssh" in ssh(pool.name, "cat /etc/nix/nix.conf").stdout

    result = run("deploys/nas.py", "-v")
    match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output(result))
    assert match and match.group(2) == "-" and match.group(3) == "-", output(result)[-2000:]


def test_the_pis_build_runs_on_the_member_and_the_run_names_it(pool):
    path, text = deploy_pi()
    assert in_store(pool.name, path)  # built there
    assert ssh(pool.name, f"cat {path}/build-arch").stdout.strip() == "aarch64"
    assert f"built {path} on nas (on pool member {pool.name})" in text
    assert f"{PI}: deployed: switch {path} (built on {pool.name})" in text


def test_with_no_local_jobs_on_the_nas_the_pool_is_the_only_way(pool):
    prepare(NIXPUSH_BENCH_NAS_MAX_JOBS="0")
    try:
        assert "max-jobs = 0" in ssh("nas", "cat /etc/nix/nix.conf").stdout
        path, text = deploy_pi(NIXPUSH_BENCH_NAS_MAX_JOBS="0")
        assert in_store(pool.name, path)
        assert f"(built on {pool.name})" in text
    finally:
        prepare()  # group_data/server.py's max-jobs again
    assert "max-jobs = 8" in ssh("nas", "cat /etc/nix/nix.conf").stdout


def test_a_member_that_is_down_is_skipped_and_the_pi_still_deploys(pool):
    fleet.set_link(pool, up=False)
    try:
        path, text = deploy_pi()
    finally:
        fleet.set_link(pool, up=True)
    assert not in_store(pool.name, path)
    # Built on the NAS itself (notes such as a reboot needed may follow the line, never "built on").
    assert re.search(rf"{PI}: deployed: switch {re.escape(path)}(?! \(built on)", text), text[
        -3000:
    ]
    assert f"nas: pool member {pool.name} skipped: " in text


def test_a_member_with_another_host_key_is_refused_naming_it(pool):
    impostor = (fleet.host(PI).dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    fields = ssh("nas", f"cat {MACHINES_FILE}").stdout.strip().split()
    fields[7] = base64.b64encode(" ".join(impostor).encode()).decode()
    ssh("nas", f"echo {json.dumps(' '.join(fields))} > {MACHINES_FILE}")
    try:
        path, text = deploy_pi()
    finally:
        prepare()
    assert not in_store(pool.name, path)
    assert (
        f"nas: pool member {pool.name} skipped: its SSH host key is not the ssh_host_key its "
        "machines line pins: refused"
    ) in text
    # Built on the NAS itself (notes such as a reboot needed may follow the line, never "built on").
    assert re.search(rf"{PI}: deployed: switch {re.escape(path)}(?! \(built on)", text), text[
        -3000:
    ]
