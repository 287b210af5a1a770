"""
Checks that a NixOS host's running system has what its generated fragment asks
(``operations/nixos/fragments.py``) where no other module checks it: the deploy user's authorized
key and passwordless sudo, and nixpush's timers. Nothing is written (``/etc`` is generated on
NixOS); a host that lacks something fails, naming the options to set.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.operation import operation
from pyinfra.context import host
from typing_extensions import override

from operations.builder import binfmt, nix, pull
from operations.builder.binfmt import MissingPaths
from operations.builder.timers import UNIT_DIR, exec_quote, unit_names
from operations.core.failures import fail_host
from operations.core.files import ACCOUNT_NAME, LinesFact, LinesOfFile
from operations.core.nixexpr import attr_path_of, nix_value
from operations.core.nixos_advice import nixos_options_error
from operations.data.fleet import HostSpec
from operations.data.schedule import MODES
from operations.trust.ssh import authorized_by_nixos

# `sudo -l` lists a rule granting every command as root without a password as
# `(root) NOPASSWD: ALL` (the fragment's), or wider: `(ALL) ...`, `(ALL : ALL) ...`.
_PASSWORDLESS_ALL = re.compile(r"\((ALL|root)(\s*:\s*[\w-]+)?\)\s+NOPASSWD:\s*ALL")


class SudoRules(LinesFact):
    """The sudo rules of ``user`` as ``sudo -l -U`` lists them (run it as root)."""

    @override
    def command(self, user: str) -> StringCommand:
        return StringCommand("sudo -n -l -U", QuoteString(user), "2>/dev/null || true")


def passwordless_for_all(rules: list[str]) -> bool:
    """Whether ``SudoRules`` lines grant every command without a password."""
    return any(_PASSWORDLESS_ALL.search(line) for line in rules)


def sudo_rule(user: str) -> dict[str, object]:
    """
    The ``security.sudo.extraRules`` entry the fragment gives the account nixpush logs in as:
    every command, as root only, without a password. No narrower rule works: pyinfra runs each
    command as ``sudo -H sh -c '...'``, so sudo only ever sees ``sh``.
    """
    return {
        "users": [user],
        "runAs": "root",
        "commands": [{"command": "ALL", "options": ["NOPASSWD"]}],
    }


def sudo_user(spec: HostSpec) -> str | None:
    """The account nixpush runs commands as under sudo on the host (``_sudo`` set, ``ssh_user``
    not root), or None: ``sudo_user(spec) == "beau"``."""
    user = spec.ssh_user
    return user if spec.sudo and user not in (None, "root") else None


def _sudo_option(user: str) -> str | None:
    """The option to set when ``user`` lacks passwordless sudo (facts of the current host)."""
    if passwordless_for_all(host.get_fact(SudoRules, user=user)):
        return None
    return f"security.sudo.extraRules = {nix_value([sudo_rule(user)])};"


@operation()
def check_nixos_sudo(user: str) -> Generator[PyinfraCommand, None, None]:
    """
    On a NixOS host nixpush runs commands on under sudo (a builder: every build and copy),
    check its configuration gives ``user`` passwordless sudo as root (the fragment's rule).

    + user: the account nixpush logs in as (``sudo_user``)

    **Example:**

    .. code:: python

        nixos_checks.check_nixos_sudo(user="beau")
    """
    if not ACCOUNT_NAME.fullmatch(user):
        raise OperationError(f"{host.name}: {user!r} is not an account name")
    option = _sudo_option(user)
    if option is not None:
        yield fail_host(nixos_options_error(host.name, [option]))
    else:
        host.noop(f"{host.name} runs NixOS and already gives {user} passwordless sudo")


@operation()
def check_nixos_deploy_user(user: str, key: str) -> Generator[PyinfraCommand, None, None]:
    """
    On a NixOS target, check its configuration authorizes ``key`` for ``user`` and gives the
    user passwordless sudo for every command (pyinfra runs ``sudo -H sh -c ...``).

    + user: the deploy user (``ssh_user``)
    + key: the builder's deploy key, ``ssh-ed25519 AAAA...``

    **Example:**

    .. code:: python

        nixos_checks.check_nixos_deploy_user(user="beau", key=trust.ssh_public_key)
    """
    if not ACCOUNT_NAME.fullmatch(user):
        raise OperationError(f"{host.name}: {user!r} is not an account name")
    options = []
    if not authorized_by_nixos(user, key):
        path = attr_path_of(("users", "users", user, "openssh", "authorizedKeys", "keys"))
        options.append(f"{path} = {nix_value([key])};")
    sudo = _sudo_option(user) if user != "root" else None
    if sudo is not None:
        options.append(sudo)
    if options:
        yield fail_host(nixos_options_error(host.name, options))
    else:
        host.noop(f"{host.name} runs NixOS and already lets the builder in as {user}, with sudo")


def unit_lines(text: str) -> list[str]:
    """The ``Key=Value`` lines of a unit file a NixOS rendering must hold too (``WantedBy=``
    aside: NixOS links the unit into ``<target>.wants`` instead)."""
    return [
        line.strip()
        for line in text.splitlines()
        if "=" in line and line.strip()[:1] not in ("#", ";", "[") and not line.startswith("Wanted")
    ]


# How the fragment's units run nixpush-run: `"/nix/store/...-python3-...-env/bin/python" "-m"
# "operations.run.runner" ARGS` (operations.nixos.fragments.nixos_exec_start), not the program.
_NIXOS_RUNNER = '"/nix/store/[^"]*/bin/python" "-m" "operations.run.runner"'


def same_unit_line(wanted: str, have: set[str], program: str | None) -> bool:
    """Whether a unit's lines ``have`` hold the unit file line ``wanted``: as is, or for
    ``ExecStart=`` of ``program``, as the NixOS fragment runs it."""
    if wanted in have:
        return True
    quoted = exec_quote(program) if program is not None else None
    if quoted is None or not wanted.startswith(f"ExecStart={quoted}"):
        return False
    args = re.escape(wanted.removeprefix(f"ExecStart={quoted}"))
    return any(re.fullmatch(f"ExecStart={_NIXOS_RUNNER}{args}", line) for line in have)


@operation()
def check_nixos_timers(
    units: Mapping[str, str], unit_dir: str = UNIT_DIR, program: str | None = None
) -> Generator[PyinfraCommand, None, None]:
    """
    On a NixOS host, check the running configuration has nixpush's units (the fragment's
    ``systemd.services``/``systemd.timers``), timers wanted by ``timers.target``; with no
    ``units``, that it has none of them.

    + units: file name -> content, ``schedule.unit_files(schedule)`` (empty: no schedule)
    + unit_dir: where NixOS links the units
    + program: the schedule's ``program``: the fragment runs nixpush from its Nix environment
      instead, with the same arguments

    **Example:**

    .. code:: python

        nixos_checks.check_nixos_timers(units=schedule.unit_files(wanted))
    """
    missing: list[str] = []
    for unit, text in sorted(units.items()):
        current = host.get_fact(LinesOfFile, path=f"{unit_dir}/{unit}")
        have = {line.strip() for line in (current.lines if current else ())}
        if current is None or any(
            not same_unit_line(line, have, program) for line in unit_lines(text)
        ):
            missing.append(unit)
    wants = [f"{unit_dir}/timers.target.wants/{unit}" for unit in units if unit.endswith(".timer")]
    if wants:
        missing += [path.rsplit("/", 1)[1] for path in host.get_fact(MissingPaths, paths=wants)]
    stray = [
        unit
        for mode in MODES
        for unit in unit_names(mode)
        if unit not in units and host.get_fact(LinesOfFile, path=f"{unit_dir}/{unit}") is not None
    ]
    if missing or stray:
        problems = [f"{', '.join(sorted(set(missing)))} missing or different"] if missing else []
        problems += [f"{', '.join(stray)} not scheduled"] if stray else []
        yield fail_host(
            f"{host.name} runs NixOS, so deploys/schedule.py writes no units: {'; '.join(problems)}"
            f"; run `pyinfra @local deploys/nixos_config.py` and rebuild {host.name} with "
            "its fragment imported (its systemd.services and systemd.timers)"
        )
        return
    if units:
        host.noop(f"{host.name} runs NixOS and already has {', '.join(sorted(units))}")
    else:
        host.noop(f"{host.name} runs NixOS and has no nixpush units, as scheduled")


def check_nixos_builder(spec: HostSpec, served: Mapping[str, Sequence[str]]) -> None:
    """
    Add the operations that check a NixOS builder (deploy code): Nix settings first (its
    failure names every option, boot.binfmt.emulatedSystems included, in one message), then
    the QEMU handlers, then ``nix.sshServe`` for each builder user's pulling targets.

    + spec: the builder's ``HostSpec``
    + served: builder user -> the pulling targets' client keys (``pull.client_keys_by_user``)
    """
    systems = list(spec.binfmt_emulated_systems)
    nix.nix_settings(
        name="Check Nix builds for the emulated systems (NixOS)",
        systems=systems,
        max_jobs=spec.nix_max_jobs,
    )
    binfmt.emulated_systems(
        name="Check QEMU binfmt handlers (NixOS)", systems=systems, native_system=spec.nix_system
    )
    for user, keys in served.items():
        pull.check_nixos_ssh_serve(
            name=f"Check nix.sshServe for {user} (NixOS)", user=user, keys=list(keys)
        )
