"""A builder's pool: the data keys and their checks, the machines lines, both ends' operations."""

from __future__ import annotations

import base64

from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.facts.server import User

from operations.builder import pool
from operations.builder.pool import PoolFile, pool_file, pool_machines
from operations.core.files import FileState, LineFile, LinesOfFile, SecretFile
from operations.data.fleet import check_fleet, fleet_errors, pool_members
from operations.push import where
from tests.unit.fake_host import FakeHost, run
from tests.unit.test_fleet import NAS_DATA, STRICT

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJRMwHca5yENjEsDlRj//qRs+Z+ddJffpxF39eU5/d1F"
MEMBER = {
    "nix_system": "aarch64-linux",
    "ssh_hostname": "10.0.0.50",
    "ssh_port": 2222,
    "ssh_host_key": f"{HOST_KEY} root@bld",
    "nix_max_jobs": 4,
    "speed_factor": 4,
    **STRICT,
}
PI = {"nix_system": "aarch64-linux", "builder_host": "nas", "ssh_hostname": "pi.test", **STRICT}
LINE = (
    "ssh-ng://nix-ssh@nixpush-builder-bld aarch64-linux /root/.ssh/nixpush_pool 4 4 "
    f"nixos-test,benchmark,big-parallel - {base64.b64encode(HOST_KEY.encode()).decode()}"
)


def pooled(nas=None, member=None):
    """The NAS with ``bld`` in its pool, and a Pi it builds for; data overrides, None deletes."""

    def merged(data, overrides):
        return {k: v for k, v in {**data, **(overrides or {})}.items() if v is not None}

    nas_member = ("nas", merged({**NAS_DATA, "remote_builders": ["bld"]}, nas))
    return {
        "minimal": [nas_member, ("pi", PI), ("bld", merged(MEMBER, member))],
        "server": [nas_member],
    }


# The data and its checks


def test_a_sound_pool_passes_and_reads_into_specs(write_inventory):
    specs = check_fleet(write_inventory(pooled()))
    assert specs["nas"].remote_builders == ("bld",)
    assert specs["bld"].offered_systems == ("aarch64-linux",)  # what it builds, by default
    assert (specs["bld"].speed_factor, specs["bld"].nix_max_jobs) == (4, 4)
    assert pool_members(specs) == ["bld"]
    assert not specs["bld"].is_target


def test_a_member_not_in_the_inventory_is_named(write_inventory):
    problems = fleet_errors(write_inventory(pooled(nas={"remote_builders": ["bdl"]})))
    assert problems == [
        "nas: remote_builders names 'bdl', which is not in the inventory; name hosts of the "
        "inventory that build for it, among: pi, bld"
    ]


def test_the_builder_itself_is_no_member(write_inventory):
    (problem,) = fleet_errors(write_inventory(pooled(nas={"remote_builders": ["nas"]})))
    assert problem.startswith("nas: remote_builders names 'nas', which is the builder itself")


def test_a_member_without_a_host_key_or_address_is_refused(write_inventory):
    problems = fleet_errors(
        write_inventory(pooled(member={"ssh_host_key": None, "ssh_hostname": None}))
    )
    assert problems == [
        "bld: ssh_hostname is missing, so nas can't reach it as a remote builder; set it to the "
        "member's address",
        "bld: ssh_host_key is missing, so nas can't verify it as a remote builder; set it to its "
        "public host key (`ssh-keyscan -t ed25519 HOST`, checked out of band)",
    ]


def test_a_member_offering_what_it_cannot_build_is_refused(write_inventory):
    (problem,) = fleet_errors(write_inventory(pooled(member={"builder_systems": ["x86_64-linux"]})))
    assert problem == (
        "bld: builder_systems ['x86_64-linux'] has systems it does not build (it builds: "
        "aarch64-linux); remove them, or add them to its binfmt_emulated_systems"
    )


def test_bad_speed_factor_and_features_are_named(write_inventory):
    problems = fleet_errors(
        write_inventory(pooled(member={"speed_factor": 0, "builder_features": ["a b"]}))
    )
    assert problems == [
        "bld: speed_factor is 0; set it to a whole number of 1 or more",
        "bld: builder_features is ['a b']; set it to a list of Nix feature names",
    ]


# The machines lines


def test_the_machines_line_carries_what_the_member_offers(write_inventory):
    specs = check_fleet(write_inventory(pooled()))
    (machine,) = pool_machines(specs, "nas")
    assert machine.machines_line() == LINE
    assert (machine.hostname, machine.port) == ("10.0.0.50", 2222)  # in the ssh alias


def test_features_and_systems_from_data(write_inventory):
    member = {"builder_features": ["big-parallel", "kvm"], "builder_systems": ["aarch64-linux"]}
    (machine,) = pool_machines(check_fleet(write_inventory(pooled(member=member))), "nas")
    assert machine.machines_line().split()[5] == "big-parallel,kvm"


def test_the_pool_file_replaces_its_lines_drops_old_members_and_keeps_foreign_ones(
    write_inventory,
):
    specs = check_fleet(write_inventory(pooled()))
    foreign = "ssh://builder@big x86_64-linux - 4 2 kvm - -"
    old = "ssh-ng://nix-ssh@nixpush-builder-bld aarch64-linux /root/.ssh/nixpush_pool 1 1 - - -"
    gone = "ssh-ng://nix-ssh@nixpush-builder-pi aarch64-linux /root/.ssh/nixpush_pool 1 1 - - -"
    assert pool_file(specs, "nas").lines([foreign, old, gone]) == [foreign, LINE]


# The builder's operation

KEY = FileState(regular=True, mode=0o600)


def builder(machines: LineFile | None, key: FileState | None = KEY) -> FakeHost:
    host = FakeHost("nas")
    host.fact(User, "root")
    host.fact(LinesOfFile, machines, path="/etc/nix/machines")
    host.fact(SecretFile, key, path="/root/.ssh/nixpush_pool")
    return host


def test_the_machines_file_already_right_is_a_noop(write_inventory):
    machines = pool_file(check_fleet(write_inventory(pooled())), "nas")
    host = builder(LineFile(0o644, "root", "root", (LINE,)))
    assert run(host, pool.pool_machines_file, pool=machines) == []
    assert host.noops == ["/etc/nix/machines already lists nixpush-builder-bld"]


def test_the_machines_file_is_written_with_the_pool(write_inventory):
    machines = pool_file(check_fleet(write_inventory(pooled())), "nas")
    (command,) = run(builder(None), pool.pool_machines_file, pool=machines)
    assert isinstance(command, StringCommand)
    assert base64.b64decode(command.connector_arguments["_stdin"]).decode() == f"{LINE}\n"


def test_without_the_pool_key_the_builder_fails_before_the_file_changes(write_inventory):
    machines = pool_file(check_fleet(write_inventory(pooled())), "nas")
    (command,) = run(builder(None, key=None), pool.pool_machines_file, pool=machines)
    assert isinstance(command, FunctionCommand)
    assert str(command.args[0]) == (
        "nas: the pool client key /root/.ssh/nixpush_pool is missing; install it with "
        "deploys/secrets.py first (a secret with that dest in its data)"
    )


def test_no_pool_and_no_machines_file_is_a_noop():
    host = builder(None)
    assert run(host, pool.pool_machines_file, pool=PoolFile(())) == []
    assert host.noops == ["nas has no pool and no /etc/nix/machines"]


def test_no_local_jobs_with_a_pool(write_inventory):
    assert check_fleet(write_inventory(pooled(nas={"nix_max_jobs": 0})))["nas"].nix_max_jobs == 0


def test_no_local_jobs_needs_a_pool(write_inventory):
    alone = pooled(nas={"nix_max_jobs": 0, "remote_builders": None})
    (problem,) = fleet_errors(write_inventory(alone))
    assert problem == (
        "nas: nix_max_jobs is 0, so it builds nothing itself, and it has no remote_builders to "
        "build for it; set it to 1 or more, or give it a pool"
    )


# Where it was built: Nix 2.8's own log lines, as recorded on the bench

DRV = "/nix/store/d7lyv379q0vx3b3b8gi5yak7pjzzpb22-nixos-system-pi4-pool-try-2.drv"
OUT = "/nix/store/5w95ai738f6l4ifly1jxdq7k3r8765sd-nixos-system-pi4-pool-try-2"
URI = "ssh-ng://nix-ssh@nixpush-builder-bld"
REMOTE = (
    f'@nix {{"action":"start","fields":["{DRV}","{URI}",1,1],"id":1,"level":3,'
    f'"text":"building \'{DRV}\' on \'{URI}\'","type":105}}'
)
# The member's own log of the same build, forwarded: no machine.
FORWARDED = (
    f'@nix {{"action":"start","fields":["{DRV}","",1,1],"id":2,"level":3,'
    f'"text":"building \'{DRV}\'","type":105}}'
)
SKIPPED = (
    '@nix {"action":"msg","level":0,"msg":"cannot build on \'ssh-ng://nix-ssh@nixpush-builder-'
    "bld': \\u001b[31;1merror:\\u001b[0m cannot open connection to remote store "
    "'ssh-ng://nix-ssh@nixpush-builder-bld': \\u001b[35;1m\\u001b[31;1merror:\\u001b[0m "
    'unexpected end-of-file\\u001b[0m"}'
)


def test_remote_builds_name_the_member_and_ignore_its_forwarded_log():
    assert where.remote_builds([REMOTE, FORWARDED]) == {DRV: "bld"}
    assert where.built_on(DRV, OUT, "nas", {DRV: "bld"}) == "bld"
    assert where.built_on(None, OUT, "nas", {DRV: "bld"}) == "bld"  # by name
    assert where.built_on(None, OUT, "nas", {}) == "nas"
    assert where.machine_name("ssh://builder@big") == "ssh://builder@big"


def test_skipped_members_say_why_without_colours():
    assert where.skipped_members([SKIPPED]) == {
        "bld": "cannot open connection to remote store 'ssh-ng://nix-ssh@nixpush-builder-bld': "
        "unexpected end-of-file"
    }


def test_progress_names_the_members_building():
    line = where.progress_with_machines("0 of 1 derivations built", [REMOTE])
    assert line == "0 of 1 derivations built; sent to the pool (bld: 1)"
    assert where.progress_with_machines("0 of 1 derivations built", []) == (
        "0 of 1 derivations built"
    )


def test_the_host_key_check_quotes_the_member():
    command = where.host_key_check_command("a b; whoami").get_raw_value()
    assert command.startswith("set -- 'nixpush-builder-a b; whoami' ; a=$1; ")
