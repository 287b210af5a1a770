"""
The NixOS fragments: per NixOS host, one Nix module holding what nixpush would otherwise write
into ``/etc`` (which NixOS generates), derived from the same inventory and sops data the
deploys use. The owner imports it in the host's configuration and rebuilds.

- a builder (``deploys/nas.py``'s hosts): ``boot.binfmt.emulatedSystems``,
  ``nix.settings.max-jobs``, ``nix.sshServe.*`` with the pulling targets' client keys, and
  nixpush's timers (``systemd.services``/``systemd.timers``, from ``operations.builder.timers``'s
  unit files; with schedule ``node_exporter`` also the node exporter reading their metrics);
- a target (a host with ``builder_host``): ``nix.settings.extra-trusted-public-keys`` (the
  builder's signing key), the deploy user's ``openssh.authorizedKeys.keys`` (the builder's
  deploy key), and with pull builds ``nix.distributedBuilds``,
  ``nix.buildMachines``, ``programs.ssh.extraConfig`` and ``programs.ssh.knownHosts``;
- either, when nixpush logs in as an account other than root (``_sudo``): passwordless sudo for
  it, as root (``security.sudo.extraRules``).

Only public halves go in, derived in memory (``operations.trust.keys``); no secret is ever rendered.

.. code:: python

    fragment = host_fragment(specs, "pi4")
    fragment.render()   # "# nixpush's settings for pi4 ... { pkgs, ... }: { ... }"
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.api.state import State
from pyinfra.context import ctx_state, host
from pyinfra_cli.inventory import make_inventory

from operations.builder.pool import is_pool_member, pool_machines, served_keys
from operations.builder.pull import build_machine_for, nixos_ssh_serve, pulls
from operations.builder.timers import exec_quote, unit_files
from operations.core.failures import host_step
from operations.core.files import write_atomically
from operations.core.grammar import is_host_name
from operations.core.nixexpr import Interpolated, Raw, attr_path_of, nix_binding
from operations.data.fleet import FleetError, HostSpec, builders
from operations.nixos.checks import sudo_rule, sudo_user
from operations.trust.keys import builder_trust
from operations.trust.ssh import known_hosts_name

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.inventory import Inventory

# The only account NixOS's nix.sshServe serves.
NIXOS_SSH_SERVE_USER = "nix-ssh"
# nixpush's Python environment from nixpkgs (``ENV_EXPRESSION``, ``env.nix`` here): what the
# checkout's ``default.nix`` imports (its ``shell.nix`` uses it), and the same text written
# beside the fragments in a directory of its own (``ENV_FILE``), so a directory's ``*.nix`` are
# the hosts' modules only. A fragment that runs nixpush (the schedule's units) binds it to
# ``ENV_NAME``.
ENV_FILE = "env/default.nix"
ENV_NAME = "nixpushPython"
# What nixpush-run needs on its PATH under systemd on NixOS: pyinfra (the environment's), sops
# (decrypting), ssh-keygen (public halves), git (the report's revision).
SCHEDULE_PATH = (Raw(ENV_NAME), Raw("pkgs.sops"), Raw("pkgs.openssh"), Raw("pkgs.git"))
# The environment's expression (package data: a non-editable install has it too).
ENV_EXPRESSION = (resources.files(__package__) / "env.nix").read_text(encoding="utf-8")
# How a unit runs nixpush-run from that environment: the module, from the checkout.
RUNNER = ("-m", "operations.run.runner")

Options = dict[str | tuple[str, ...], Any]


@dataclass(frozen=True)
class Section:
    """Options that belong together, with the comment rendered above them."""

    comment: str
    options: Options


@dataclass(frozen=True)
class Fragment:
    """One host's NixOS module: its sections, rendered by ``render``."""

    host: str
    sections: tuple[Section, ...] = field(default_factory=tuple)

    @property
    def uses_env(self) -> bool:
        """Whether it imports nixpush's Nix environment (``ENV_FILE``, written beside it)."""
        return ENV_NAME in _names(self.options)

    @property
    def options(self) -> Options:
        """Every option of every section: ``fragment.options["nix.settings.max-jobs"] == 8``."""
        return {key: value for section in self.sections for key, value in section.options.items()}

    def render(self) -> str:
        """The module's text: a header saying where it comes from, the module's arguments
        (only those it uses: deadnix removes the others), then the options."""
        body: list[str] = []
        for section in self.sections:
            body.append("")
            body.extend(f"  # {line}" for line in section.comment.split("\n"))
            for key, value in section.options.items():
                path = attr_path_of(key) if isinstance(key, tuple) else attr_path_of(key.split("."))
                body.append(f"  {nix_binding(path, value, indent=2, level=1)}")
        names = _names(self.options)
        header: list[str] = [
            f"# nixpush's settings for {self.host}: generated by `pyinfra @local",
            "# deploys/nixos_config.py` from the inventory and the public halves of the keys in",
            "# the sops file (no secret is in here). Regenerate it rather than edit it, and import",
            f"# it from {self.host}'s configuration, e.g. hosts/{self.host}/default.nix (only the",
            "# hosts' files are modules; env/ is nixpush's Python environment):",
            f"# imports = [ ../../nixpush/{self.host}.nix ];",
            "{ pkgs, ... }:" if names & {"pkgs", ENV_NAME} else "{ ... }:",
        ]
        if ENV_NAME in names:
            header += [
                "let",
                f"  {ENV_NAME} = import ./{ENV_FILE} {{ inherit pkgs; }};",
                "in",
            ]
        return "\n".join([*header, "{", *body[1:], "}", ""])


def _names(value: object) -> set[str]:
    """The first part of every name (``Raw``, also inside ``Interpolated``) ``value`` uses."""
    if isinstance(value, Raw):
        return {value.expression.split(".")[0]}
    if isinstance(value, Interpolated):
        return {name for part in value.parts for name in _names(part)}
    if isinstance(value, Mapping):
        return {name for item in value.values() for name in _names(item)}
    if isinstance(value, list | tuple):
        return {name for item in value for name in _names(item)}
    return set()


# -- what each host's fragment holds ---------------------------------------------------


def builder_sections(
    spec: HostSpec | None,
    pull_keys: Mapping[str, Sequence[str]],
    schedule_units: Mapping[str, str],
    program: str | None = None,
) -> list[Section]:
    """A builder's sections (``spec`` None: the host builds for nobody): emulation and
    max-jobs, pull builds served, nixpush's timers (on whichever host has a schedule; their
    ``ExecStart=`` runs nixpush from the Nix environment instead of ``program``)."""
    sections: list[Section] = []
    building: Options = {}
    if spec is not None and spec.binfmt_emulated_systems:
        building["boot.binfmt.emulatedSystems"] = list(spec.binfmt_emulated_systems)
    if spec is not None and spec.nix_max_jobs is not None:
        building["nix.settings.max-jobs"] = spec.nix_max_jobs
    if building:
        sections.append(
            Section(
                "Builds for the targets (deploys/nas.py): QEMU for their systems, which also\n"
                "adds them to Nix's extra-platforms, and parallel builds.",
                building,
            )
        )
    keys = [key for user_keys in pull_keys.values() for key in user_keys]
    if keys:
        sections.append(
            Section(
                "Pull builds (deploys/pull.py): the targets' client keys may run nix-daemon\n"
                f"as {NIXOS_SSH_SERVE_USER}, a trusted Nix user.",
                {option: value for option, value in nixos_ssh_serve(keys).items()},
            )
        )
    if schedule_units:
        sections.append(
            Section(
                "nixpush's unattended runs (deploys/schedule.py on Debian): the same units,\n"
                f"nixpush run by nixpkgs' Python ({ENV_FILE}) from the checkout.",
                schedule_options(schedule_units, program),
            )
        )
    return sections


def schedule_options(units: Mapping[str, str], program: str | None = None) -> Options:
    """``systemd.services``/``systemd.timers`` holding what ``unit_files`` renders, section by
    section (``[Unit]`` -> ``unitConfig``, ...); ``WantedBy=`` becomes ``wantedBy``. With
    ``program`` (the schedule's), ``ExecStart=`` runs ``python -m operations.run.runner`` of
    the Nix environment instead (``nixos_exec_start``): nothing from a virtualenv."""
    options: Options = {}
    for name, text in sorted(units.items()):
        unit, _, kind = name.rpartition(".")
        settings: dict[str, Any] = {}
        for section, pairs in unit_sections(text).items():
            if section == "Install":
                for key, value in pairs.items():
                    if key == "WantedBy":
                        settings["wantedBy"] = " ".join(_as_list(value)).split()
                continue
            config: dict[str, object] = dict(pairs)
            exec_start = pairs.get("ExecStart")
            if program is not None and isinstance(exec_start, str):
                config["ExecStart"] = nixos_exec_start(exec_start, program)
            settings[f"{section[0].lower()}{section[1:]}Config"] = config
        if kind == "service":
            settings["path"] = list(SCHEDULE_PATH)
        options[("systemd", f"{kind}s", unit)] = settings
    return options


def node_exporter_section(metrics_dir: str) -> Section:
    """The node exporter, its textfile collector reading nixpush-run's ``metrics_dir``."""
    node = "services.prometheus.exporters.node"
    return Section(
        "nixpush-run's metrics (schedule node_exporter): the node exporter's textfile\n"
        "collector reads the directory nixpush-run writes nixpush_<mode>.prom in.",
        {
            f"{node}.enable": True,
            f"{node}.enabledCollectors": ["textfile"],
            f"{node}.extraFlags": [f"--collector.textfile.directory={metrics_dir}"],
        },
    )


def nixos_exec_start(exec_start: str, program: str) -> Interpolated:
    """``"<program>" ARGS`` as the NixOS unit runs it: ``"${nixpushPython}/bin/python" "-m"
    "operations.run.runner" ARGS`` (its working directory is the checkout)."""
    quoted = exec_quote(program)
    if not exec_start.startswith(quoted):
        raise ValueError(f"ExecStart {exec_start!r} does not run {program!r}")
    runner = " ".join(exec_quote(arg) for arg in RUNNER)
    return Interpolated(('"', Raw(ENV_NAME), f'/bin/python" {runner}{exec_start[len(quoted) :]}'))


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def unit_sections(text: str) -> dict[str, dict[str, str | list[str]]]:
    """A unit file's ``[Section]`` -> ``Key`` -> value (a list when the key repeats)."""
    sections: dict[str, dict[str, str | list[str]]] = {}
    current: dict[str, str | list[str]] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        key, sep, value = stripped.partition("=")
        if current is None or not sep:
            raise ValueError(f"not a unit file line: {line!r}")
        if key in current:
            current[key] = [*_as_list(current[key]), value]
        else:
            current[key] = value
    return sections


def target_sections(
    spec: HostSpec, trust_ssh_key: str, trust_nix_key: str, pull: Options | None
) -> list[Section]:
    """A target's sections: trust of the builder's pushes, the deploy user, pull builds."""
    user = spec.ssh_user or "root"
    sections = [
        Section(
            f"Push deploys from {spec.builder_host}: its signing key (extra-: the default\n"
            "cache.nixos.org key stays) and its deploy key for the deploy user.",
            {
                "nix.settings.extra-trusted-public-keys": [trust_nix_key],
                ("users", "users", user, "openssh", "authorizedKeys", "keys"): [trust_ssh_key],
            },
        )
    ]
    if pull:
        sections.append(
            Section(
                f"Pull builds (deploys/pull.py): build on {spec.builder_host} through Nix, with\n"
                "the client key deploys/secrets.py installs from sops.",
                pull,
            )
        )
    return sections


def pull_client_options(target: HostSpec, builder: HostSpec) -> Options:
    """A pulling target's options: the builder in ``nix.buildMachines``, reached through an
    ssh alias whose host key root's ssh knows."""
    machine = build_machine_for(target, builder)
    assert builder.ssh_hostname is not None
    return {
        "nix.distributedBuilds": True,
        "nix.buildMachines": [machine.nixos_build_machine()],
        "programs.ssh.extraConfig": machine.nixos_ssh_config(),
        ("programs", "ssh", "knownHosts", machine.alias): {
            "hostNames": [machine.alias, known_hosts_name(builder.ssh_hostname, machine.port)],
            "publicKey": machine.host_key,
        },
    }


def host_fragment(specs: Mapping[str, HostSpec], name: str) -> Fragment:
    """
    ``name``'s fragment, its keys derived on the controller from sops (``SecretError``,
    ``SopsError``) and its data checked (``FleetError``): bad input stops
    the run before anything is written. A host nixpush configures nothing on has no sections.
    """
    spec = specs[name]
    builds = name in builders(specs) or is_pool_member(specs, name)
    # A pool member serves its builders through the same nix.sshServe as pulling targets.
    pull_keys = served_keys(specs, name) if builds else {}
    others = [user for user in pull_keys if user != NIXOS_SSH_SERVE_USER]
    if others:
        raise FleetError(
            [
                f"{target.name}: builder_user {target.builder_user!r} can't be served by "
                f"NixOS's nix.sshServe on {name}, whose account is {NIXOS_SSH_SERVE_USER}; "
                f"set builder_user to {NIXOS_SSH_SERVE_USER!r}"
                for target in specs.values()
                if target.builder_host == name and target.builder_user in others
            ]
        )
    schedule = spec.schedule
    units = unit_files(schedule) if schedule.enabled else {}
    sections = builder_sections(spec if builds else None, pull_keys, units, schedule.program)
    if schedule.enabled and schedule.node_exporter and schedule.metrics_dir:
        sections.append(node_exporter_section(schedule.metrics_dir))
    if spec.remote_builders:
        sections.append(pool_section(spec, specs))
    if spec.pushed_by is not None:  # a host that builds itself is pushed nothing
        trust = builder_trust(specs, spec.pushed_by, name)
        pull = pull_client_options(spec, specs[spec.pushed_by]) if pulls(spec) else None
        sections += target_sections(spec, trust.ssh_public_key, trust.nix_public_key, pull)
    if spec.is_target and spec.keep_generations is not None:
        sections.append(generations_section(spec.keep_generations))
    user = sudo_user(spec)
    if sections and user is not None:
        sections.append(sudo_section(user))
    return Fragment(name, tuple(sections))


def pool_section(builder: HostSpec, specs: Mapping[str, HostSpec]) -> Section:
    """A builder's pool (``remote_builders``): each member in ``nix.buildMachines``, reached
    through an ssh alias whose host key root's ssh knows (its pinned ``ssh_host_key``)."""
    machines = pool_machines(specs, builder.name)
    options: Options = {
        "nix.distributedBuilds": True,
        "nix.buildMachines": [machine.nixos_build_machine() for machine in machines],
        "programs.ssh.extraConfig": "".join(machine.nixos_ssh_config() for machine in machines),
    }
    for machine in machines:
        options[("programs", "ssh", "knownHosts", machine.alias)] = {
            "hostNames": [machine.alias, known_hosts_name(machine.hostname, machine.port)],
            "publicKey": machine.host_key,
        }
    return Section(
        "The build pool (deploys/nas.py): Nix's build hook sends derivations to these\n"
        "machines, with the pool key deploys/secrets.py installs from sops.",
        options,
    )


def generations_section(keep: int) -> Section:
    """keep_generations for the boot loader: NixOS then lists (and, with extlinux, keeps in
    /boot) only the newest ``keep`` generations. Each loader reads its own option only when it
    is enabled, so all three are set: the fragment need not know which one the host uses."""
    return Section(
        f"keep_generations = {keep}: nixpush deletes older system generations after a confirmed\n"
        "switch; the boot loader lists (extlinux: keeps in /boot) as many.",
        {
            f"boot.loader.{loader}.configurationLimit": keep
            for loader in ("generic-extlinux-compatible", "systemd-boot", "grub")
        },
    )


def sudo_section(user: str) -> Section:
    """Passwordless sudo for the account nixpush logs in as, on every host whose fragment
    configures something nixpush then runs commands for under sudo (builds, copies, checks,
    activations): as root only, for every command, since pyinfra runs each as
    ``sudo -H sh -c ...``."""
    return Section(
        f"nixpush runs its commands here as {user} through `sudo -H sh -c ...`: passwordless\n"
        "sudo, as root only (sudo sees only `sh`, so no narrower rule works).",
        {"security.sudo.extraRules": [sudo_rule(user)]},
    )


# -- the whole fleet's, from the controller ------------------------------------------------


def fleet_inventory(path: str, cwd: str | None = None) -> Inventory:
    """The fleet's inventory as ``pyinfra PATH ...`` run from ``cwd`` (default: here) loads it,
    ``group_data/`` included (``cwd``'s and the one beside the file), without connecting to any
    host. ``path`` is relative to ``cwd`` or absolute, anywhere. ``FleetError`` when it is not a
    file."""
    directory = cwd or os.getcwd()
    file = Path(directory, path)
    if not file.is_file():
        what = "is not a file" if file.exists() else "does not exist"
        raise FleetError(
            [f"nixpush_inventory: {file} {what}; run from the directory holding the fleet's "
             "inventory.py, or set --data nixpush_inventory=FILE to the fleet's inventory "
             "(relative to where pyinfra runs, or absolute)"]
        )  # fmt: skip
    # The CLI's loader executes the files under a State of its own (it records the file it
    # runs); the deploy's state stays untouched.
    with ctx_state.use(State()):
        inventory: Inventory = make_inventory(path, cwd=directory)
    return inventory


@dataclass(frozen=True)
class FleetFragments:
    """Every file ``deploys/nixos_config.py`` writes: path -> (operation name, text); and the
    hosts that need no fragment."""

    files: dict[Path, tuple[str, str]]
    without: tuple[str, ...]


def fleet_fragments(specs: Mapping[str, HostSpec]) -> FleetFragments:
    """Each host's fragment (``host_fragment``) at its ``fragment_path``, and ``ENV_FILE`` in
    every hosts' fragment directory, whether or not a fragment imports it yet: a controller's
    ``shell.nix`` may use it from the first run, and enabling the schedule later adds no file
    to ``git add``."""
    files: dict[Path, tuple[str, str]] = {}
    without: list[str] = []
    for name in specs:
        directory = fragments_dir(specs[name])
        env = directory / ENV_FILE
        files[env] = (f"Write nixpush's Nix environment ({ENV_FILE})", ENV_EXPRESSION)
        fragment = host_fragment(specs, name)
        if not fragment.sections:
            without.append(name)
            continue
        path = fragment_path(directory, name)
        files[path] = (f"Write {name}'s NixOS fragment ({path.name})", fragment.render())
    return FleetFragments(files, tuple(without))


def fragments_dir(spec: HostSpec, cwd: str | None = None) -> Path:
    """Where the host's fragment goes: its ``nixos_fragments_dir`` (default ``nixos``),
    relative to ``cwd`` (default: where pyinfra runs)."""
    return Path(cwd or os.getcwd(), spec.nixos_fragments_dir)


def fragment_path(directory: Path, host_name: str) -> Path:
    """``nixos/pi4.nix``; ``FleetError`` for a name that would leave ``directory``
    (``../x``, a line break: anything but a host name's grammar)."""
    if not is_host_name(host_name):
        raise FleetError(
            [
                f"{host_name!r}: no fragment is written for this host: its name would leave "
                f"{directory}; rename the host"
            ]
        )
    return directory / f"{host_name}.nix"


# -- the operation ---------------------------------------------------------------------


def _current_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


@operation()
def fragment_file(path: str, text: str) -> Generator[PyinfraCommand, None, None]:
    """
    Write a host's fragment on the controller (where pyinfra runs), atomically, 0644.

    + path: the fragment's path on the controller (``fragment_path``)
    + text: its content (``host_fragment(...).render()``), which holds no secret

    Nothing is written when the file already holds ``text``; ``--dry`` writes nothing.

    **Example:**

    .. code:: python

        fragments.fragment_file(path="/home/beau/nixos-config/nixpush/pi4.nix", text=text)
    """
    if _current_text(Path(path)) == text:
        host.noop(f"{path} is up to date")
        return
    yield FunctionCommand(_write_fragment, (Path(path), text), {})


@host_step
def _write_fragment(state: State, host: Host, path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text, 0o644)
    host.log_styled(f"wrote {path}", log_func=logger.info)
    return True
