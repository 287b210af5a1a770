"""
Pull builds: a target (a Pi) uses its builder as a Nix remote builder, so a build started on
the Pi runs on the NAS. Nix's own remote-build protocol (``ssh-ng``) does the work; this module
configures both ends.

Builder side (``deploys/nas.py``): a system user (``builder_user``, e.g. ``nix-ssh``) whose
``authorized_keys`` lets each pulling target's client key run ``nix-daemon --stdio`` and
nothing else, and that user in nix.conf ``trusted-users`` (Nix's remote build copies the
inputs unsigned and builds input-addressed derivations: both need a trusted user).

Target side (``deploys/pull.py``): an ``ssh_config.d`` Host alias for the builder (an
``ssh-ng://`` URL has no port), a line in ``/etc/nix/machines`` carrying the builder's host
key, and ``builders = @/etc/nix/machines`` in nix.conf. The client key itself is a secret in
the target's data, installed at ``PULL_KEY_PATH`` by ``deploys/secrets.py``:

.. code:: python

    machine = build_machine_for(specs["pi4"], specs["nas"])
    machine.machines_line()
    # ssh-ng://nix-ssh@nixpush-builder-nas aarch64-linux /root/.ssh/nixpush_builder 8 1
    #     nixos-test,benchmark,big-parallel - c3NoLWVkMjU1MTkgQUFBQS4uLg==
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Directory
from typing_extensions import override

from operations.builder.nix import MACHINES_FILE, NixConfig
from operations.core.failures import fail_host, require_root
from operations.core.files import (
    ACCOUNT_NAME,
    MANAGED_HEADER,
    LinesOfFile,
    SecretFile,
    chmod_file,
    chown_file,
    lines_in_file,
)
from operations.core.nixexpr import nix_value
from operations.core.nixos_advice import NIXOS_AUTHORIZED_KEYS_DIR, nixos_options_error
from operations.core.systems import KNOWN_SYSTEMS
from operations.data.fleet import FleetError, HostSpec
from operations.trust.keys import PULL_KEY_COMMENT, PULL_KEY_PATH, parse_public_key, pull_client_key
from operations.trust.ssh import user_account

SSH_CONFIG_DIR = "/etc/ssh/ssh_config.d"
PULL_FEATURES = ("nixos-test", "benchmark", "big-parallel")
# The comment closing each authorized_keys line nixpush writes: how it finds its own lines.

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]*")
_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")


def builder_alias(builder_name: str) -> str:
    """The ssh Host alias a target reaches its builder by: ``nixpush-builder-nas``."""
    return f"nixpush-builder-{builder_name}"


def default_home(user: str) -> str:
    """Where a builder user nixpush creates lives: ``/var/lib/nix-ssh``."""
    return f"/var/lib/{user}"


def check_account(user: str) -> str:
    """``user`` if it is a plain account name (``useradd``'s rules), else ValueError."""
    if not ACCOUNT_NAME.fullmatch(user) or user == "root":
        raise ValueError(f"builder_user {user!r} is not a dedicated account name like 'nix-ssh'")
    return user


@dataclass(frozen=True, kw_only=True)
class BuildMachine:
    """
    One remote builder as a target sees it; every field is checked, so the machines line and
    the ssh_config block render without quoting (they have none: Nix splits on whitespace).

    + alias: the ssh Host alias in the machines URI (``builder_alias``)
    + hostname, port: where the builder's sshd listens, as the target reaches it
    + user: the restricted account on the builder (``builder_user``)
    + systems: what the builder builds for this target (the target's ``nix_system``)
    + max_jobs: parallel builds the target may start there (the builder's ``nix_max_jobs``)
    + host_key: the builder's SSH host key, ``ssh-ed25519 AAAA...`` (its ``ssh_host_key``)
    + key_path: the target's client key (``PULL_KEY_PATH``)
    + features: Nix ``supportedFeatures`` of the builder
    """

    alias: str
    hostname: str
    port: int = 22
    user: str
    systems: tuple[str, ...]
    max_jobs: int = 1
    host_key: str
    key_path: str = PULL_KEY_PATH
    features: tuple[str, ...] = PULL_FEATURES
    speed_factor: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _NAME.fullmatch(self.alias):
            problems.append(f"ssh alias {self.alias!r} is not a plain host name")
        if not _HOSTNAME.fullmatch(self.hostname):
            problems.append(f"hostname {self.hostname!r} is not a host name or address")
        if not 1 <= self.port <= 65535 or isinstance(self.port, bool):
            problems.append(f"port {self.port!r} is not from 1 to 65535")
        try:
            check_account(self.user)
        except ValueError as e:
            problems.append(str(e))
        if not self.systems or any(s not in KNOWN_SYSTEMS for s in self.systems):
            problems.append(f"systems {list(self.systems)!r} are not known Nix systems")
        for number, what in ((self.max_jobs, "max-jobs"), (self.speed_factor, "speed factor")):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                problems.append(f"{what} {number!r} is not a whole number of 1 or more")
        parsed = parse_public_key(self.host_key)
        if parsed is None or self.host_key.split() != list(parsed) or not _is_base64(parsed[1]):
            problems.append(f"host key {self.host_key!r} is not 'TYPE BASE64' of an SSH key")
        if not _PATH.fullmatch(self.key_path) or "/../" in f"{self.key_path}/":
            problems.append(f"key path {self.key_path!r} is not a plain absolute path")
        if not self.features or any(not _NAME.fullmatch(f) for f in self.features):
            problems.append(f"features {list(self.features)!r} are not plain names")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def uri(self) -> str:
        """``ssh-ng://nix-ssh@nixpush-builder-nas``: the port comes from the ssh alias."""
        return f"ssh-ng://{self.user}@{self.alias}"

    @property
    def host_key_base64(self) -> str:
        """The machines file's last field: base64 of ``TYPE BASE64``, as Nix decodes it."""
        return base64.b64encode(self.host_key.encode()).decode()

    def machines_line(self) -> str:
        """The ``/etc/nix/machines`` line (Nix 2.8's eight fields)."""
        return " ".join(
            (
                self.uri,
                ",".join(self.systems),
                self.key_path,
                str(self.max_jobs),
                str(self.speed_factor),
                ",".join(self.features),
                "-",  # mandatory features: none
                self.host_key_base64,
            )
        )

    def ssh_config_lines(self) -> list[str]:
        """The ssh_config block for the alias (``SSH_CONFIG_DIR/<alias>.conf``)."""
        return [
            f"{MANAGED_HEADER}: how Nix reaches its remote builder ({MACHINES_FILE})",
            f"Host {self.alias}",
            f"  HostName {self.hostname}",
            f"  Port {self.port}",
            f"  User {self.user}",
            f"  IdentityFile {self.key_path}",
            "  IdentitiesOnly yes",
            # Nix writes the machines line's host key to a temporary known_hosts under the
            # URI's host name, the alias: this makes ssh look the key up by that name.
            f"  HostKeyAlias {self.alias}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
        ]

    @property
    def ssh_config_path(self) -> str:
        return f"{SSH_CONFIG_DIR}/{self.alias}.conf"

    def nixos_build_machine(self) -> dict[str, object]:
        """The ``nix.buildMachines`` entry NixOS renders into this machines line."""
        return {
            "hostName": self.alias,
            "protocol": "ssh-ng",
            "sshUser": self.user,
            "sshKey": self.key_path,
            "systems": list(self.systems),
            "maxJobs": self.max_jobs,
            "speedFactor": self.speed_factor,
            "supportedFeatures": list(self.features),
            "publicHostKey": self.host_key_base64,
        }

    def nixos_ssh_config(self) -> str:
        """``programs.ssh.extraConfig``: the ssh_config block, without nixpush's marker."""
        return "".join(f"{line.strip()}\n" for line in self.ssh_config_lines()[1:])

    def nixos_options(self) -> list[str]:
        """What a NixOS target sets instead of nixpush writing ``/etc``."""
        return [
            "nix.distributedBuilds = true;",
            f"nix.buildMachines = {nix_value([self.nixos_build_machine()])};",
            f"programs.ssh.extraConfig = {nix_value(self.nixos_ssh_config())};",
        ]


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


def pulls(spec: HostSpec) -> bool:
    """Whether a host builds on its builder: it has ``builder_host`` and ``builder_user``."""
    return spec.builder_host is not None and spec.builder_user is not None


def pulling_targets(specs: Mapping[str, HostSpec], builder: str) -> list[HostSpec]:
    """The targets that pull builds from ``builder``, in inventory order."""
    return [s for s in specs.values() if s.builder_host == builder and pulls(s)]


def build_machine_for(target: HostSpec, builder: HostSpec) -> BuildMachine:
    """
    ``target``'s view of ``builder`` from the inventory, or ``FleetError`` naming the key to
    set (the builder's ``ssh_host_key``, its ``ssh_hostname``) or the bad value.
    """
    if target.builder_user is None:
        raise FleetError([f"{target.name}: builder_user is missing; set it, e.g. 'nix-ssh'"])
    missing = {
        "ssh_hostname": (builder.ssh_hostname, "reach", "set it to the builder's address"),
        "ssh_host_key": (
            builder.ssh_host_key,
            "verify",
            "set it to its public host key (`ssh-keyscan -p "
            f"{builder.ssh_port or 22} -t ed25519 {builder.ssh_hostname or 'HOST'}`, checked "
            "out of band)",
        ),
    }
    problems = [
        f"{builder.name}: {key} is missing, so {target.name} can't {why} it for pull builds; {fix}"
        for key, (value, why, fix) in missing.items()
        if value is None
    ]
    if problems:
        raise FleetError(problems)
    assert builder.ssh_hostname is not None and builder.ssh_host_key is not None
    try:
        return BuildMachine(
            alias=builder_alias(builder.name),
            hostname=builder.ssh_hostname,
            port=target.builder_port or 22,
            user=target.builder_user,
            systems=(target.nix_system,),
            max_jobs=builder.nix_max_jobs or 1,
            host_key=" ".join(builder.ssh_host_key.split()[:2]),
        )
    except ValueError as e:
        raise FleetError([f"{target.name}: pull builds from {builder.name}: {e}"]) from None


def client_keys_by_user(specs: Mapping[str, HostSpec], builder: str) -> dict[str, list[str]]:
    """
    For each ``builder_user`` of the targets pulling from ``builder``, their public client
    keys (``pull_client_key``, derived on the controller from sops): what the builder
    authorizes. ``SecretError`` naming the target and the fix.
    """
    keys: dict[str, list[str]] = {}
    for target in pulling_targets(specs, builder):
        assert target.builder_user is not None
        key = pull_client_key(specs, target.name, builder)
        keys.setdefault(target.builder_user, []).append(key)
    return keys


def restricted_key_line(key: str, daemon: str) -> str:
    """``restrict,command="/usr/bin/nix-daemon --stdio" ssh-ed25519 AAAA... comment``."""
    parsed = parse_public_key(key)
    if parsed is None or any(c in key for c in '\n\r\0"\\') or key.split()[:2] != list(parsed):
        raise ValueError(f"{key!r} is not a plain SSH public key line")
    if not _PATH.fullmatch(daemon):
        raise ValueError(f"nix-daemon path {daemon!r} is not a plain absolute path")
    return f'restrict,command="{daemon} --stdio" {key.strip()}'


# Facts


class ProgramPath(FactBase[str | None]):
    """Where ``program`` is on the PATH of the session (``command -v``); None if nowhere."""

    @override
    def command(self, program: str) -> StringCommand:
        return StringCommand("command -v --", QuoteString(program), "|| true")

    @override
    def process(self, output: list[str]) -> str | None:
        return output[0] if output and output[0].startswith("/") else None


class SshResolved(FactBase[dict[str, str]]):
    """What root's ssh makes of a host name (``ssh -G``): ``{"hostname": ..., "port": ...}``."""

    @override
    def command(self, alias: str) -> StringCommand:
        return StringCommand("ssh -G --", QuoteString(alias), "2>/dev/null || true")

    @override
    @staticmethod
    def default() -> dict[str, str]:
        return {}

    @override
    def process(self, output: list[str]) -> dict[str, str]:
        pairs = (line.split(" ", 1) for line in output)
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _root_file(
    path: str, lines: Sequence[str], mode: int, what: str
) -> Generator[PyinfraCommand, None, None]:
    """Make ``path`` (root's) hold exactly ``lines`` with ``mode``."""
    current = host.get_fact(LinesOfFile, path=path)
    yield from lines_in_file(path, lines, current, owner="root", group="root", mode=mode, what=what)


# Operations: builder side


@operation()
def builder_account(user: str) -> Generator[PyinfraCommand, None, None]:
    """
    A system account on the builder for remote builds, created when missing.

    + user: the account name (the targets' ``builder_user``, e.g. ``nix-ssh``)

    ``useradd --system`` with its own group, home ``/var/lib/<user>`` (root's, 0755, made here;
    an existing home the account owns is given to root: an account that owns its home could
    replace ``~/.ssh`` and lift its restriction) and shell ``/bin/sh``: sshd runs the forced
    command through the login shell, so it can't be nologin. The password is ``*``: no
    password login, keys still work. An existing account is kept as it is; one whose shell is
    nologin or false fails the host.

    **Example:**

    .. code:: python

        pull.builder_account(user="nix-ssh")
    """
    check_account(user)
    require_root(f"creating the builder user {user!r} needs root")
    account = user_account(user)
    if account is None:
        home = default_home(user)
        yield StringCommand(
            "useradd --system --user-group --no-create-home --home-dir", QuoteString(home),
            "--shell /bin/sh --password '*' --comment 'Nix remote builds (nixpush)' --",
            QuoteString(user),
        )  # fmt: skip
        yield StringCommand("mkdir -p -m 0755 --", QuoteString(home))
        return
    if account.shell in _NOLOGIN_SHELLS:
        yield fail_host(
            f"{host.name}: user {user!r} has the shell {account.shell}, and sshd runs the "
            f"forced nix-daemon command through it; run `usermod -s /bin/sh {user}`"
        )
        return
    home_dir = host.get_fact(Directory, path=account.home)
    if not home_dir:
        yield StringCommand("mkdir -p -m 0755 --", QuoteString(account.home))
        return
    if home_dir.get("user") not in (None, "root") or _group_or_other_writable(home_dir):
        # An account that owns its home can replace ~/.ssh and lift its own restriction.
        yield chown_file(account.home, "root", "root")
        yield chmod_file(account.home, 0o755)
        return
    host.noop(f"user {user} exists (home {account.home}, root's; shell {account.shell})")


def _group_or_other_writable(directory: Mapping[str, object]) -> bool:
    # pyinfra's Directory fact gives the mode as octal digits read as an int (755).
    mode = directory.get("mode")
    return isinstance(mode, int) and int(str(mode), 8) & 0o022 != 0


@operation()
def builder_authorized_keys(
    user: str, keys: Sequence[str], daemon: str | None = None
) -> Generator[PyinfraCommand, None, None]:
    """
    Let each of ``keys`` run ``nix-daemon --stdio`` as ``user``, and nothing else.

    + user: the builder account (``builder_account``)
    + keys: public key lines, each ending in ``PULL_KEY_COMMENT<target>`` (``pull_client_key``)
    + daemon: absolute path of nix-daemon; default: where the host's PATH finds it

    Each key gets ``restrict,command="<daemon> --stdio"``: no shell, no forwarding, no pty,
    whatever the client asks for. The file and ``~/.ssh`` belong to root (0644, 0755), so the
    account can't change its own restriction. Lines nixpush wrote for targets no longer in
    ``keys`` are removed (a retired Pi loses access); other lines are kept, except one carrying
    the same key without the restriction.

    **Example:**

    .. code:: python

        pull.builder_authorized_keys(user="nix-ssh", keys=["ssh-ed25519 AAAA... nixpush-pull:pi4"])
    """
    check_account(user)
    require_root(f"{user}'s authorized_keys belong to root")
    if daemon is None:
        daemon = host.get_fact(ProgramPath, program="nix-daemon")
        if daemon is None:
            yield fail_host(f"{host.name}: nix-daemon is not on root's PATH")
            return
    try:
        wanted = [restricted_key_line(key, daemon) for key in keys]
    except ValueError as e:
        raise OperationError(f"{host.name}: {e}") from None
    blobs = {parse_public_key(key) for key in keys}
    account = user_account(user)
    home = account.home if account is not None else default_home(user)
    ssh_dir = f"{home.rstrip('/')}/.ssh"
    path = f"{ssh_dir}/authorized_keys"

    ssh_dir_now = host.get_fact(Directory, path=ssh_dir)
    if not ssh_dir_now:
        yield StringCommand("mkdir -p -m 0755 --", QuoteString(ssh_dir))
    elif ssh_dir_now.get("user") not in (None, "root") or _group_or_other_writable(ssh_dir_now):
        yield chown_file(ssh_dir, "root", "root")
        yield chmod_file(ssh_dir, 0o755)
    current = host.get_fact(LinesOfFile, path=path)

    def ours(line: str) -> bool:
        tokens = line.split()
        return bool(tokens) and (
            tokens[-1].startswith(PULL_KEY_COMMENT) or parse_public_key(line) in blobs
        )

    kept = [line for line in (current.lines if current else ()) if line and not ours(line)]
    yield from _root_file(
        path,
        [*kept, *wanted],
        0o644,
        f"lets {len(wanted)} key{'s' if len(wanted) != 1 else ''} run only {daemon} --stdio",
    )


@operation()
def check_nixos_ssh_serve(user: str, keys: Sequence[str]) -> Generator[PyinfraCommand, None, None]:
    """
    On a NixOS builder, check ``nix.sshServe`` serves ``keys`` to trusted ``user``; fail the
    host naming the options to set otherwise (``/etc`` is generated there).

    + user: the targets' ``builder_user``; NixOS's sshServe account is always ``nix-ssh``
    + keys: the targets' public client keys

    **Example:**

    .. code:: python

        pull.check_nixos_ssh_serve(user="nix-ssh", keys=["ssh-ed25519 AAAA... nixpush-pull:pi4"])
    """
    if user != "nix-ssh":
        yield fail_host(
            f"{host.name} runs NixOS, whose nix.sshServe account is nix-ssh: set the "
            f"targets' builder_user to 'nix-ssh', not {user!r}"
        )
        return
    config = host.get_fact(NixConfig) or {}
    served = host.get_fact(LinesOfFile, path=f"{NIXOS_AUTHORIZED_KEYS_DIR}/{user}")
    present = {parse_public_key(line) for line in (served.lines if served else ())}
    trusted = user in (config.get("trusted-users") or [])
    if trusted and all(parse_public_key(key) in present for key in keys):
        host.noop(f"{host.name} runs NixOS and nix.sshServe already serves {len(keys)} keys")
        return
    yield fail_host(nixos_options_error(host.name, nixos_ssh_serve_options(keys)))


def nixos_ssh_serve(keys: Sequence[str]) -> dict[str, object]:
    """The NixOS options a builder sets for pull builds (the seed's ``nix.sshServe``)."""
    return {
        "nix.sshServe.enable": True,
        "nix.sshServe.protocol": "ssh-ng",
        "nix.sshServe.write": True,
        "nix.sshServe.trusted": True,
        "nix.sshServe.keys": list(keys),
    }


def nixos_ssh_serve_options(keys: Sequence[str]) -> list[str]:
    """``nixos_ssh_serve`` as ``option = value;`` texts, for messages."""
    return [f"{option} = {nix_value(value)};" for option, value in nixos_ssh_serve(keys).items()]


# Operations: target side


@operation()
def builder_ssh_alias(machine: BuildMachine) -> Generator[PyinfraCommand, None, None]:
    """
    The ssh Host alias the machines URI names: address, port, user, key and host-key name.

    + machine: ``build_machine_for(target, builder)``

    Written to ``/etc/ssh/ssh_config.d/<alias>.conf`` (root, 0644), which Debian's
    ``/etc/ssh/ssh_config`` includes; after writing, ``ssh -G`` must resolve the alias, or the
    host fails saying the Include is missing.

    **Example:**

    .. code:: python

        pull.builder_ssh_alias(machine=build_machine_for(specs["pi4"], specs["nas"]))
    """
    require_root(f"{machine.ssh_config_path} belongs to root")
    changes = list(
        _root_file(
            machine.ssh_config_path,
            machine.ssh_config_lines(),
            0o644,
            f"points {machine.alias} at {machine.hostname}:{machine.port}",
        )
    )
    if not changes:
        return
    yield from changes
    yield StringCommand(
        "ssh -G --", QuoteString(machine.alias), "| grep -qxF",
        QuoteString(f"hostkeyalias {machine.alias}"),
        "|| { echo", QuoteString(
            f"ssh does not read {machine.ssh_config_path}: add `Include {SSH_CONFIG_DIR}/*.conf`"
            " at the top of /etc/ssh/ssh_config"
        ), ">&2; exit 1; }",
    )  # fmt: skip


@operation()
def build_machine(
    machine: BuildMachine, machines_file: str = MACHINES_FILE
) -> Generator[PyinfraCommand, None, None]:
    """
    The builder's line in Nix's machines file; other builders' lines are kept.

    + machine: ``build_machine_for(target, builder)``
    + machines_file: path of the machines file

    The line for the same URI is replaced. The client key must already be installed at
    ``machine.key_path`` (``deploys/secrets.py``): without it the host fails, since every
    remote build would.

    **Example:**

    .. code:: python

        pull.build_machine(machine=build_machine_for(specs["pi4"], specs["nas"]))
    """
    require_root(f"{machines_file} belongs to root")
    key = host.get_fact(SecretFile, path=machine.key_path)
    if key is None or not key.regular:
        yield fail_host(
            f"{host.name}: the builder-client key {machine.key_path} is missing; "
            "install it with deploys/secrets.py first"
        )
        return
    current = host.get_fact(LinesOfFile, path=machines_file)
    lines = [
        line for line in (current.lines if current else ()) if line.split()[:1] != [machine.uri]
    ]
    yield from _root_file(
        machines_file,
        [*lines, machine.machines_line()],
        0o644,
        f"lists {machine.uri} for {', '.join(machine.systems)}",
    )


@operation()
def check_nixos_pull_client(machine: BuildMachine) -> Generator[PyinfraCommand, None, None]:
    """
    On a NixOS target, check Nix already uses ``machine``; fail the host naming the options
    (``nix.buildMachines``, ``programs.ssh.extraConfig``) otherwise.

    + machine: ``build_machine_for(target, builder)``

    **Example:**

    .. code:: python

        pull.check_nixos_pull_client(machine=build_machine_for(specs["pi4"], specs["nas"]))
    """
    config = host.get_fact(NixConfig) or {}
    machines = host.get_fact(LinesOfFile, path=MACHINES_FILE)
    resolved = host.get_fact(SshResolved, alias=machine.alias)
    builders = str(config.get("builders", ""))
    listed = machines is not None and machine.machines_line() in [
        " ".join(line.split()) for line in machines.lines
    ]
    reached = (resolved.get("hostname"), resolved.get("port"), resolved.get("hostkeyalias")) == (
        machine.hostname,
        str(machine.port),
        machine.alias,
    )
    if listed and reached and f"@{MACHINES_FILE}" in builders:
        host.noop(f"{host.name} runs NixOS and already builds on {machine.uri}")
        return
    yield fail_host(nixos_options_error(host.name, machine.nixos_options()))
