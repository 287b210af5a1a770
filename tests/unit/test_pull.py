"""Pull builds: the machines line and ssh alias (pure), and the operations on faked facts."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from pyinfra.api import OperationError
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.facts.files import Directory
from pyinfra.facts.server import User

from operations.builder import nix, pull
from operations.builder.nix import NixConfig
from operations.builder.pull import (
    BuildMachine,
    ProgramPath,
    SshResolved,
    build_machine_for,
    restricted_key_line,
)
from operations.core.files import FileState, LineFile, LinesOfFile, SecretFile
from operations.data.fleet import FleetError, HostSpec
from operations.trust.ssh import Account, UserAccount
from tests.unit.fake_host import FakeHost, nix_host, run, shell, written

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJRMwHca5yENjEsDlRj//qRs+Z+ddJffpxF39eU5/d1F"
PI4_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICjyJ6x1+Qicm0O5bQ7lYbw8pYIQzAgmkf9eSkfwuk6/"
PI5_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFCVMuAi+OTXj+cnZj7bgkEMcfawiND6eXvQwC+FuIJR"
KEYS = [f"{PI4_KEY} nixpush-pull:pi4", f"{PI5_KEY} nixpush-pull:pi5"]
DAEMON = "/usr/bin/nix-daemon"
RESTRICTED = [f'restrict,command="{DAEMON} --stdio" {key}' for key in KEYS]
AUTH = "/var/lib/nix-ssh/.ssh/authorized_keys"

MACHINE = BuildMachine(
    alias="nixpush-builder-nas",
    hostname="10.0.0.2",
    port=2222,
    user="nix-ssh",
    systems=("aarch64-linux",),
    max_jobs=8,
    host_key=HOST_KEY,
)
LINE = (
    "ssh-ng://nix-ssh@nixpush-builder-nas aarch64-linux /root/.ssh/nixpush_builder 8 1 "
    f"nixos-test,benchmark,big-parallel - {base64.b64encode(HOST_KEY.encode()).decode()}"
)
ALIAS_CONF = "/etc/ssh/ssh_config.d/nixpush-builder-nas.conf"

FRAGMENT_HINT = (
    "(`pyinfra @local deploys/nixos_config.py` writes them to nas's generated fragment, "
    "which its configuration imports)"
)


# Pure: the machines line, the ssh alias, the authorized_keys line


def test_machines_line_has_nix_28s_eight_fields():
    assert MACHINE.machines_line() == LINE
    fields = LINE.split()
    assert len(fields) == 8
    assert base64.b64decode(fields[7]).decode() == HOST_KEY


def test_ssh_alias_carries_the_port_the_uri_cannot():
    assert MACHINE.ssh_config_lines()[1:] == [
        "Host nixpush-builder-nas",
        "  HostName 10.0.0.2",
        "  Port 2222",
        "  User nix-ssh",
        "  IdentityFile /root/.ssh/nixpush_builder",
        "  IdentitiesOnly yes",
        "  HostKeyAlias nixpush-builder-nas",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 10",
    ]
    assert MACHINE.uri == "ssh-ng://nix-ssh@nixpush-builder-nas"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hostname", "nas; whoami", "is not a host name"),
        ("hostname", "nas\nHost *", "is not a host name"),
        ("hostname", "-oProxyCommand=x", "is not a host name"),
        ("alias", "nas builder", "is not a plain host name"),
        ("user", "nix ssh", "is not a dedicated account"),
        ("user", "root", "is not a dedicated account"),
        ("user", "$(whoami)", "is not a dedicated account"),
        ("port", 0, "is not from 1 to 65535"),
        ("systems", ("aarch64-linux,x86_64-linux",), "not known Nix systems"),
        ("systems", (), "not known Nix systems"),
        ("max_jobs", 0, "max-jobs 0"),
        ("host_key", f"{HOST_KEY}\nssh-rsa AAAA", "is not 'TYPE BASE64'"),
        ("host_key", "ssh-ed25519 not!base64", "is not 'TYPE BASE64'"),
        ("key_path", "/root/my key", "is not a plain absolute path"),
        ("key_path", "/root/../etc/shadow", "is not a plain absolute path"),
        ("features", ("big-parallel,kvm",), "are not plain names"),
        ("features", ("a b",), "are not plain names"),
    ],
)
def test_hostile_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message.replace("$", r"\$")):
        dataclasses.replace(MACHINE, **{field: value})


def test_nixos_options_name_build_machines_and_the_alias():
    options = MACHINE.nixos_options()
    assert options[0] == "nix.distributedBuilds = true;"
    assert options[1].startswith('nix.buildMachines = [ { hostName = "nixpush-builder-nas"; ')
    assert 'protocol = "ssh-ng"; sshUser = "nix-ssh";' in options[1]
    assert 'systems = [ "aarch64-linux" ]; maxJobs = 8;' in options[1]
    assert options[2].startswith('programs.ssh.extraConfig = "Host nixpush-builder-nas\\n')


def _spec(name: str, **data: object) -> HostSpec:
    base: dict[str, object] = {"nix_system": "x86_64-linux", "nixos_config": name}
    return HostSpec(name=name, **{**base, **data})  # type: ignore[arg-type]


def test_build_machine_for_derives_from_both_hosts():
    nas = _spec(
        "nas",
        ssh_hostname="nas.lan",
        ssh_host_key=f"{HOST_KEY} root@nas",
        nix_max_jobs=8,
        binfmt_emulated_systems=("aarch64-linux",),
    )
    pi4 = _spec("pi4", nix_system="aarch64-linux", builder_host="nas", builder_user="nix-ssh")
    machine = build_machine_for(pi4, nas)
    assert machine.machines_line() == LINE
    assert (machine.hostname, machine.port, machine.host_key) == ("nas.lan", 22, HOST_KEY)


def test_build_machine_for_names_missing_builder_data():
    pi4 = _spec("pi4", nix_system="aarch64-linux", builder_host="nas", builder_user="nix-ssh")
    with pytest.raises(FleetError) as error:
        build_machine_for(pi4, _spec("nas"))
    assert error.value.problems == (
        "nas: ssh_hostname is missing, so pi4 can't reach it for pull builds; "
        "set it to the builder's address",
        "nas: ssh_host_key is missing, so pi4 can't verify it for pull builds; set it to its "
        "public host key (`ssh-keyscan -p 22 -t ed25519 HOST`, checked out of band)",
    )


def test_build_machine_for_names_a_hostile_value():
    nas = _spec("nas", ssh_hostname="nas lan", ssh_host_key=HOST_KEY)
    pi4 = _spec("pi4", nix_system="aarch64-linux", builder_host="nas", builder_user="nix-ssh")
    with pytest.raises(FleetError, match="pi4: pull builds from nas: hostname 'nas lan'"):
        build_machine_for(pi4, nas)


def test_restricted_key_line():
    assert restricted_key_line(KEYS[0], DAEMON) == RESTRICTED[0]
    for hostile in (f'{PI4_KEY} x" ,command="sh', f"{PI4_KEY}\n{PI5_KEY}", "not a key"):
        with pytest.raises(ValueError, match="is not a plain SSH public key line"):
            restricted_key_line(hostile, DAEMON)
    with pytest.raises(ValueError, match="is not a plain absolute path"):
        restricted_key_line(KEYS[0], "nix-daemon --stdio; sh")


def test_facts_process_recorded_output():
    assert UserAccount().process(["nix-ssh:x:986:986:Nix:/var/lib/nix-ssh:/bin/sh"]) == Account(
        "/var/lib/nix-ssh", "/bin/sh"
    )
    assert UserAccount().process([]) is None
    assert ProgramPath().process(["/usr/bin/nix-daemon"]) == DAEMON
    assert ProgramPath().process([]) is None
    resolved = SshResolved().process(["hostname 10.0.0.2", "port 2222", "hostkeyalias x"])
    assert resolved == {"hostname": "10.0.0.2", "port": "2222", "hostkeyalias": "x"}


def test_fact_commands_quote_hostile_values():
    assert UserAccount().command(user="x; whoami").get_raw_value() == (
        "getent passwd -- 'x; whoami' || true"
    )
    assert SshResolved().command(alias="a b").get_raw_value() == (
        "ssh -G -- 'a b' 2>/dev/null || true"
    )


# Operations, builder side


def builder(account: Account | None = None, **facts: object) -> FakeHost:
    host = FakeHost("nas")
    host.fact(User, "root")
    host.fact(UserAccount, account, user="nix-ssh")
    host.fact(ProgramPath, DAEMON, program="nix-daemon")
    home = account.home if account else "/var/lib/nix-ssh"
    host.fact(Directory, facts.get("home_dir", {"mode": 755}), path=home)
    host.fact(Directory, facts.get("ssh_dir", {"mode": 755}), path=f"{home}/.ssh")
    host.fact(LinesOfFile, facts.get("auth"), path=f"{home}/.ssh/authorized_keys")
    return host


NIX_SSH = Account("/var/lib/nix-ssh", "/bin/sh")


def test_builder_account_created_when_missing():
    assert shell(run(builder(), pull.builder_account, user="nix-ssh")) == [
        "useradd --system --user-group --no-create-home --home-dir /var/lib/nix-ssh "
        "--shell /bin/sh --password '*' --comment 'Nix remote builds (nixpush)' -- nix-ssh",
        "mkdir -p -m 0755 -- /var/lib/nix-ssh",  # root's: the account can't lift its restriction
    ]


def test_builder_account_present_is_a_noop():
    host = builder(NIX_SSH, home_dir={"mode": 755, "user": "root"})
    assert run(host, pull.builder_account, user="nix-ssh") == []
    assert host.noops == ["user nix-ssh exists (home /var/lib/nix-ssh, root's; shell /bin/sh)"]


@pytest.mark.parametrize(
    "home_dir", [{"mode": 755, "user": "nix-ssh"}, {"mode": 775, "user": "root"}]
)
def test_a_home_the_account_can_change_is_given_to_root(home_dir):
    host = builder(NIX_SSH, home_dir=home_dir)
    assert shell(run(host, pull.builder_account, user="nix-ssh")) == [
        "chown -h -- root:root /var/lib/nix-ssh",
        "chmod 0755 /var/lib/nix-ssh",
    ]


def test_builder_account_with_nologin_fails_the_host():
    host = builder(Account("/var/lib/nix-ssh", "/usr/sbin/nologin"))
    (command,) = run(host, pull.builder_account, user="nix-ssh")
    assert isinstance(command, FunctionCommand)
    assert "run `usermod -s /bin/sh nix-ssh`" in str(command.args[0])


def test_builder_account_refuses_a_hostile_name():
    with pytest.raises(ValueError, match="not a dedicated account name"):
        run(builder(), pull.builder_account, user="nix-ssh; whoami")


def test_an_ssh_dir_the_account_owns_is_given_to_root():
    host = builder(
        NIX_SSH,
        ssh_dir={"mode": 700, "user": "nix-ssh"},
        auth=LineFile(0o644, "root", "root", tuple(RESTRICTED)),
    )
    commands = shell(run(host, pull.builder_authorized_keys, user="nix-ssh", keys=KEYS))
    assert commands == [
        "chown -h -- root:root /var/lib/nix-ssh/.ssh",
        "chmod 0755 /var/lib/nix-ssh/.ssh",
    ]


def test_authorized_keys_already_right_is_a_noop():
    host = builder(NIX_SSH, auth=LineFile(0o644, "root", "root", tuple(RESTRICTED)))
    assert run(host, pull.builder_authorized_keys, user="nix-ssh", keys=KEYS) == []
    assert host.noops == [f"{AUTH} already lets 2 keys run only {DAEMON} --stdio"]


def test_authorized_keys_restricts_replaces_and_keeps_foreign_lines():
    foreign = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyBlobBBBBBBBBBBBBBBBBBBBBBBBBBBB admin"
    lines = (
        foreign,
        f"{PI4_KEY} unrestricted-copy",  # the same key without the restriction: dropped
        'restrict,command="nix-daemon --stdio" ssh-ed25519 AAAAold nixpush-pull:retired-pi',
    )
    host = builder(NIX_SSH, auth=LineFile(0o600, "nix-ssh", "nix-ssh", lines))
    (command,) = run(host, pull.builder_authorized_keys, user="nix-ssh", keys=KEYS)
    assert isinstance(command, StringCommand)
    stdin = base64.b64decode(command.connector_arguments["_stdin"]).decode()
    assert stdin == "".join(f"{line}\n" for line in (foreign, *RESTRICTED))
    assert '&& chown -- root:root "$tmp" && chmod 0644 "$tmp"' in command.get_raw_value()


def test_authorized_keys_on_a_fresh_builder_makes_a_root_owned_ssh_dir():
    host = builder(None, home_dir=None, ssh_dir=None)
    commands = shell(run(host, pull.builder_authorized_keys, user="nix-ssh", keys=KEYS[:1]))
    assert commands[0] == "mkdir -p -m 0755 -- /var/lib/nix-ssh/.ssh"
    assert f'mv -fT "$tmp" {AUTH}' in commands[1]


def test_authorized_keys_without_nix_daemon_fails_the_host():
    host = builder(NIX_SSH).fact(ProgramPath, None, program="nix-daemon")
    (command,) = run(host, pull.builder_authorized_keys, user="nix-ssh", keys=KEYS)
    assert isinstance(command, FunctionCommand)
    assert "nix-daemon is not on root's PATH" in str(command.args[0])


NIX_CONF_TEXT = "sandbox = false\nmax-jobs = 8\n"


def test_trusted_user_already_trusted_is_a_noop():
    host = nix_host("nas", NIX_CONF_TEXT + "trusted-users = root nix-ssh\n", {})
    assert run(host, nix.trusted_user, user="nix-ssh") == []
    assert host.noops == ["/etc/nix/nix.conf already trusts nix-ssh"]


def test_trusted_user_keeps_nixs_default_and_restarts_the_daemon():
    host = nix_host("nas", NIX_CONF_TEXT, {"trusted-users": ["root"]})
    commands = run(host, nix.trusted_user, user="nix-ssh")
    assert written(commands[0]) == NIX_CONF_TEXT + "trusted-users = root nix-ssh\n"
    assert shell(commands)[1] == "_restart_or_restore: /etc/nix/nix.conf"


def test_nixos_builder_is_told_the_ssh_serve_options():
    host = FakeHost("nas").fact(NixConfig, {"trusted-users": ["root"]})
    host.fact(LinesOfFile, None, path="/etc/ssh/authorized_keys.d/nix-ssh")
    (command,) = run(host, pull.check_nixos_ssh_serve, user="nix-ssh", keys=KEYS[:1])
    assert isinstance(command, FunctionCommand)
    assert str(command.args[0]) == (
        "nas runs NixOS: set nix.sshServe.enable = true; and nix.sshServe.protocol = "
        '"ssh-ng"; and nix.sshServe.write = true; and nix.sshServe.trusted = true; and '
        f'nix.sshServe.keys = [ "{KEYS[0]}" ]; in its configuration, then rebuild it'
        f" {FRAGMENT_HINT}"
    )


def test_nixos_builder_already_serving_is_a_noop():
    host = FakeHost("nas").fact(NixConfig, {"trusted-users": ["root", "nix-ssh"]})
    host.fact(
        LinesOfFile,
        LineFile(0o444, "root", "root", (PI4_KEY,)),
        path=f"{pull.NIXOS_AUTHORIZED_KEYS_DIR}/nix-ssh",
    )
    assert run(host, pull.check_nixos_ssh_serve, user="nix-ssh", keys=KEYS[:1]) == []
    assert host.noops == ["nas runs NixOS and nix.sshServe already serves 1 keys"]


# Operations, target side


def target(alias: LineFile | None = None, machines: LineFile | None = None) -> FakeHost:
    host = FakeHost("pi4")
    host.fact(User, "root")
    host.fact(LinesOfFile, alias, path=ALIAS_CONF)
    host.fact(LinesOfFile, machines, path="/etc/nix/machines")
    host.fact(SecretFile, FileState(regular=True, mode=0o600), path="/root/.ssh/nixpush_builder")
    return host


def test_ssh_alias_already_right_is_a_noop():
    host = target(alias=LineFile(0o644, "root", "root", tuple(MACHINE.ssh_config_lines())))
    assert run(host, pull.builder_ssh_alias, machine=MACHINE) == []
    assert host.noops == [f"{ALIAS_CONF} already points nixpush-builder-nas at 10.0.0.2:2222"]


def test_ssh_alias_written_then_checked_with_ssh_g():
    commands = shell(run(target(), pull.builder_ssh_alias, machine=MACHINE))
    assert f'mv -fT "$tmp" {ALIAS_CONF}' in commands[0]
    assert commands[1] == (
        "ssh -G -- nixpush-builder-nas | grep -qxF 'hostkeyalias nixpush-builder-nas' || "
        f"{{ echo 'ssh does not read {ALIAS_CONF}: add `Include /etc/ssh/ssh_config.d/*.conf` "
        "at the top of /etc/ssh/ssh_config' >&2; exit 1; }"
    )


def test_machines_line_already_there_is_a_noop():
    host = target(machines=LineFile(0o644, "root", "root", (LINE,)))
    assert run(host, pull.build_machine, machine=MACHINE) == []
    assert host.noops == [
        "/etc/nix/machines already lists ssh-ng://nix-ssh@nixpush-builder-nas for aarch64-linux"
    ]


def test_machines_line_replaced_keeping_other_builders():
    other = "ssh://builder@big x86_64-linux - 4 2 kvm - -"
    old = "ssh-ng://nix-ssh@nixpush-builder-nas aarch64-linux /root/.ssh/nixpush_builder 1 1 - - -"
    host = target(machines=LineFile(0o644, "root", "root", (other, old)))
    (command,) = run(host, pull.build_machine, machine=MACHINE)
    assert isinstance(command, StringCommand)
    assert base64.b64decode(command.connector_arguments["_stdin"]).decode() == f"{other}\n{LINE}\n"


def test_machines_line_without_the_client_key_fails_the_host():
    host = target().fact(SecretFile, None, path="/root/.ssh/nixpush_builder")
    (command,) = run(host, pull.build_machine, machine=MACHINE)
    assert isinstance(command, FunctionCommand)
    assert str(command.args[0]) == (
        "pi4: the builder-client key /root/.ssh/nixpush_builder is missing; install it with "
        "deploys/secrets.py first"
    )


def test_nix_builders_already_set_is_a_noop():
    host = nix_host("nas", NIX_CONF_TEXT + "builders = @/etc/nix/machines\n", {})
    assert run(host, nix.remote_builders) == []
    assert host.noops == ["/etc/nix/nix.conf already uses @/etc/nix/machines"]


def test_nix_builders_appended_to_other_builders():
    host = nix_host("nas", NIX_CONF_TEXT + "builders = ssh://big x86_64-linux\n", {})
    upload = run(host, nix.remote_builders)[0]
    assert written(upload) == (
        NIX_CONF_TEXT + "builders = ssh://big x86_64-linux ; @/etc/nix/machines\n"
    )


def test_nix_builders_refuses_a_hostile_path():
    with pytest.raises(OperationError, match=r"can't be named in nix\.conf"):
        run(nix_host("nas", NIX_CONF_TEXT, {}), nix.remote_builders, machines_file="/etc/m; x")


def test_nixos_target_is_told_the_build_machines_options():
    host = FakeHost("pi4").fact(NixConfig, {"builders": "@/etc/nix/machines"})
    host.fact(LinesOfFile, None, path="/etc/nix/machines")
    host.fact(SshResolved, {}, alias="nixpush-builder-nas")
    (command,) = run(host, pull.check_nixos_pull_client, machine=MACHINE)
    assert isinstance(command, FunctionCommand)
    assert "nix.distributedBuilds = true; and nix.buildMachines = [ {" in str(command.args[0])


def test_nixos_target_already_set_is_a_noop():
    host = FakeHost("pi4").fact(NixConfig, {"builders": "@/etc/nix/machines"})
    host.fact(LinesOfFile, LineFile(0o444, "root", "root", (LINE,)), path="/etc/nix/machines")
    resolved = {"hostname": "10.0.0.2", "port": "2222", "hostkeyalias": "nixpush-builder-nas"}
    host.fact(SshResolved, resolved, alias="nixpush-builder-nas")
    assert run(host, pull.check_nixos_pull_client, machine=MACHINE) == []
    assert host.noops == [
        "pi4 runs NixOS and already builds on ssh-ng://nix-ssh@nixpush-builder-nas"
    ]
