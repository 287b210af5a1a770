"""
The nixpush data contract: inventory data parsed into typed host specs, and the checks that
make a broken fleet fail before anything connects to a builder or a target.

Deploy files start with:

.. code:: python

    from pyinfra import host, state
    from operations.data.fleet import check_fleet

    specs = check_fleet(state.inventory)
    spec = specs[host.name]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pyinfra.api.connectors import get_all_connectors
from pyinfra.api.exceptions import PyinfraError
from pyinfra.connectors.ssh import SSHConnector

from operations.core import grammar
from operations.core.files import ACCOUNT_NAME
from operations.core.models import (
    ACTIONS,
    DEFAULT_ACTIVATION_TIMEOUT,
    DEFAULT_BUILD_TIMEOUT,
    DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_COPY_TIMEOUT,
    DEFAULT_MAX_PARALLEL_COPIES,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MIN_FREE_SPACE,
    Action,
    Margin,
    Safety,
)
from operations.core.systems import KNOWN_SYSTEMS, natively_built
from operations.data.health import HealthCheck, parse_check
from operations.data.reboot import REBOOT_KEYS, Reboot, parse_reboot
from operations.data.schedule import Schedule, ScheduleError, parse_schedule
from operations.data.secret import Secret, parse_secret

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.inventory import Inventory

E = TypeVar("E")

ROOTS: tuple[str, ...] = ("minimal", "common", "network", "main", "work", "gaming", "server")
DEPLOY_ACTIONS = ACTIONS
# Image hosts (``@image/NAME`` in an inventory, operations/builder/connector.py) are in this
# group of the connector's, and may be in an ``images`` group of the inventory's instead of
# roots: roots bring what running machines get (secrets, health checks), nothing an image is
# built with.
IMAGE_CONNECTOR_GROUP = "@image"
IMAGES_GROUP = "images"
# image_attr: an attribute of config.system.build, e.g. isoImage, sdImage.
_IMAGE_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")

_MAX_PORT = 65535
# Systems whose NixOS boots with extlinux (generic-extlinux-compatible) by default in nixpush.
_EXTLINUX_SYSTEMS = ("aarch64-linux", "armv7l-linux")
# A day: the longest a target waits for its confirmation, or its activation may take.
_MAX_SAFETY_SECONDS = 86400
# Waves are a handful (canary, the rest, the builder); a bigger number is a typo.
_MAX_WAVE = 99
# keep_generations: more generations than anyone keeps, far below what sh's numbers hold.
MAX_KEEP_GENERATIONS = 1000
# More would only queue in sshd: its MaxSessions is 10 unless raised.
_MAX_SESSIONS = 64
# The one key that lets a pushed-to or building host skip host key checks; its name says so.
INSECURE_KEY = "insecure_ssh_host_key_checking"
# Every data key nixpush reads, in one place: add new keys here. A key a typo or two away from
# one of these (``builder_hots``) is refused by check_fleet, naming the key it resembles.
NIXPUSH_KEYS: tuple[str, ...] = (
    "nix_system", "flake", "nixos_config", "builder_host", "builder_user", "builder_port",
    "binfmt_emulated_systems", "nix_max_jobs", "ssh_host_key", "deploy_action",
    "max_ssh_sessions", "sops_file", "secrets", "schedule", "rollback", "confirm_timeout",
    "activation_timeout", "health_checks", "max_parallel_copies", "build_timeout",
    "copy_timeout", "offline_ok", "image_attr", "image_dest", "nixos_fragments_dir",
    "nixpush_sops_file", "deploy_wave", "wave_soak", "min_free_space", "boot_dir",
    "keep_generations", "gc_after_deploy", "nixpush_inventory", INSECURE_KEY,
    "nixpush_sops_recipients", "remote_builders", "builder_systems", "speed_factor",
    "builder_features", "ssh_addresses", "provenance_file", "substitute_on_target",
    *REBOOT_KEYS,
)  # fmt: skip
# pyinfra's own connection keys nixpush reads; other keys of pyinfra's connectors are known too.
PYINFRA_KEYS: tuple[str, ...] = (
    "ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file",
    "ssh_strict_host_key_checking",
)  # fmt: skip
# Where nixpush glues a value into a command, URL or Nix attribute path.
_UNSAFE_REF = re.compile(r'^-|[\s#"]')
# What would make an address or a user name two words or an ssh option.
_UNSAFE_ADDRESS = re.compile(r"^-|[\s@]")
# Data keys holding a path on the controller (nixpush's and pyinfra's): one line each.
PATH_KEYS = (
    "sops_file", "nixpush_sops_file", "nixos_fragments_dir", "nixpush_inventory", "ssh_key",
    "ssh_known_hosts_file", "ssh_config_file",
)  # fmt: skip
# Where a target records what nixpush deployed there (provenance_file).
DEFAULT_PROVENANCE_FILE = "/var/lib/nixpush/deployed.json"
# Where fragments go (deploys/nixos_config.py), relative to where pyinfra runs.
DEFAULT_FRAGMENTS_DIR = "nixos"
# The fleet's inventory deploys/nixos_config.py reads, relative to where pyinfra runs.
DEFAULT_INVENTORY = "inventory.py"


class FleetError(PyinfraError):
    """
    The inventory breaks the nixpush data contract. ``problems`` holds one line per problem,
    each naming the host, the data key and the fix.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The text pyinfra's CLI prints (it reads ``.message`` when present)."""
        count = len(self.problems)
        heading = f"the inventory has {count} problem{'s' if count != 1 else ''}:"
        return "\n".join([heading, *(f"  {problem}" for problem in self.problems)])


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    """
    One inventory host's nixpush data, checked and typed. Build it with ``host_spec(host)``.

    + name: the inventory name
    + roots: the host's root groups, in ``ROOTS`` order
    + nix_system: ``x86_64-linux``, ``aarch64-linux``, ...
    + flake: flake reference as the builder resolves it
    + nixos_config: attribute under ``nixosConfigurations`` (default: the host's name)
    + builder_host: inventory name of the host that builds this one; set means a push target
    + builder_user, builder_port: how this host reaches its builder for pull builds
    + binfmt_emulated_systems: systems this host emulates with QEMU when building for others
    + nix_max_jobs: nix.conf ``max-jobs`` when building
    + ssh_hostname, ssh_port, ssh_user: how the controller and the builder reach this host
    + ssh_host_key: the host's public SSH host key, so other hosts can verify it
    + deploy_action: the ``Action`` (``DEPLOY_ACTIONS`` names them), what each step reads
    + max_ssh_sessions: at most this many commands at once on nixpush's SSH connection to the
      host (keep it below its sshd's ``MaxSessions``, 10 by default)
    + max_parallel_copies: as a builder, at most this many copies to targets at once
    + build_timeout, copy_timeout: as a builder, seconds a build (all of a run's toplevels) or
      one copy may take before it is stopped
    + offline_ok: an unreachable host is reported ``offline`` instead of failing the run
    + is_image: an image host (``@image/NAME``): built by deploys/image.py, never connected to
    + image_attr: the image's attribute under ``config.system.build`` (None: not requested;
      image hosts default to ``default_image_attr``)
    + image_dest: where the controller keeps the image file (None: it stays on the builder)
    + sudo: pyinfra's ``_sudo``: commands nixpush runs itself on the host (on a builder, over
      another host's operation) need it too
    + rollback: the target rolls back unless its activation is confirmed (``HostSpec.safety``)
    + confirm_timeout, activation_timeout: seconds the target waits for the confirmation, and
      ``switch-to-configuration`` may take
    + health_checks: what must pass before confirming (``operations.data.health``), merged across
      the host's roots by name
    + schedule: the controller's ``schedule`` (``operations.builder.timers``; not enabled: none)
    + deploy_wave: the activation wave (``operations.push.waves``): wave 0 first, a later one
      once every host of the earlier ones deployed and stayed healthy
    + wave_soak: seconds a deployed host waits before its health checks run again, when a
      later wave waits for it
    + min_free_space: what a target's store keeps free after a copy (``push.space.Margin``)
    + boot_dir: where the boot loader installs kernels and initrds (extlinux's layout:
      ``boot_dir/nixos``), checked for room before a switch or boot; None: not checked
    + keep_generations: after a confirmed switch, the system generations kept (None: all)
    + gc_after_deploy: collect garbage after pruning generations
    + substitute_on_target: as a target, the copy asks it to fetch first what its own
      substituters have (``nix copy --substitute-on-destination``); the builder sends the rest
    + nixpush_sops_recipients: master keys (an age recipient, a PGP fingerprint, ...) allowed
      to read the file of this builder's push and signing keys besides the controller's age
      key, e.g. a backup key kept offline
    + secrets: the host's ``secrets`` entries, merged across its roots (``host_secrets``)
    + sops_file: the sops file its secrets are decrypted from, on the controller
    + nixpush_sops_file: the sops file its push and signing keys are decrypted from (None:
      ``sops_file``)
    + nixos_fragments_dir: where deploys/nixos_config.py writes its fragment, relative to
      where pyinfra runs
    + remote_builders: as a builder, the inventory hosts of its pool: Nix's build hook sends
      them the derivations of the systems they offer (``operations.builder.pool``)
    + pool_systems: as a pool member, the systems it offers (data key ``builder_systems``;
      empty: every system it builds, ``offered_systems``)
    + speed_factor: as a pool member, Nix's ``speedFactor``: the faster member is chosen first
    + builder_features: as a pool member, Nix's ``supportedFeatures`` (empty: the defaults)
    + reboot: whether and how a confirmed switch reboots the host (``operations.data.reboot``)
    """

    name: str
    roots: tuple[str, ...] = ()
    nix_system: str
    flake: str | None = None
    nixos_config: str
    builder_host: str | None = None
    builder_user: str | None = None
    builder_port: int | None = None
    binfmt_emulated_systems: tuple[str, ...] = ()
    nix_max_jobs: int | None = None
    ssh_hostname: str | None = None
    ssh_addresses: tuple[str, ...] = ()
    # Where a target records what nixpush deployed (operations/push/provenance.py).
    provenance_file: str = DEFAULT_PROVENANCE_FILE
    ssh_port: int = 22
    ssh_user: str | None = None
    ssh_host_key: str | None = None
    deploy_action: Action = Action.SWITCH
    max_ssh_sessions: int = DEFAULT_MAX_SESSIONS
    max_parallel_copies: int = DEFAULT_MAX_PARALLEL_COPIES
    build_timeout: int = DEFAULT_BUILD_TIMEOUT
    copy_timeout: int = DEFAULT_COPY_TIMEOUT
    offline_ok: bool = False
    is_image: bool = False
    image_attr: str | None = None
    image_dest: str | None = None
    sudo: bool = False
    rollback: bool = True
    confirm_timeout: int = DEFAULT_CONFIRM_TIMEOUT
    activation_timeout: int = DEFAULT_ACTIVATION_TIMEOUT
    health_checks: tuple[HealthCheck, ...] = ()
    schedule: Schedule = field(default_factory=lambda: Schedule(enabled=False))
    deploy_wave: int = 0
    wave_soak: int = 0
    min_free_space: Margin = field(default_factory=lambda: Margin.parse(DEFAULT_MIN_FREE_SPACE))
    boot_dir: str | None = None
    keep_generations: int | None = None
    gc_after_deploy: bool = False
    substitute_on_target: bool = False
    nixpush_sops_recipients: tuple[str, ...] = ()
    secrets: tuple[Secret, ...] = ()
    sops_file: str | None = None
    nixpush_sops_file: str | None = None
    nixos_fragments_dir: str = DEFAULT_FRAGMENTS_DIR
    remote_builders: tuple[str, ...] = ()
    pool_systems: tuple[str, ...] = ()
    speed_factor: int = 1
    builder_features: tuple[str, ...] = ()
    reboot: Reboot = field(default_factory=Reboot)

    @property
    def is_target(self) -> bool:
        """Deployed by deploys/pi.py: ``host_spec(pi4).is_target is True``; an image is not."""
        return self.builder_host is not None and not self.is_image

    @property
    def builds_itself(self) -> bool:
        """A target that evaluates and builds on itself and copies nothing (the NAS)."""
        return self.is_target and self.builder_host == self.name

    @property
    def pushed_by(self) -> str | None:
        """The builder that pushes closures to this host, which must therefore trust it: None
        for a host that builds itself, an image, or a host that is no target."""
        return self.builder_host if self.is_target and not self.builds_itself else None

    def safety(self, action: Action) -> Safety:
        """How an activation for ``action`` is guarded: the host's rollback, where the action
        can be confirmed (``Action.confirmable``), and its timers."""
        return Safety(
            rollback=self.rollback and action.confirmable,
            confirm_timeout=self.confirm_timeout,
            activation_timeout=self.activation_timeout,
        )

    @property
    def builder_systems(self) -> tuple[str, ...]:
        """Systems this host can build: ``"aarch64-linux" in host_spec(nas).builder_systems``."""
        systems = [*natively_built(self.nix_system), *self.binfmt_emulated_systems]
        return tuple(dict.fromkeys(systems))

    @property
    def offered_systems(self) -> tuple[str, ...]:
        """Systems this host builds for its pool's builder: its ``builder_systems`` data, else
        every system it builds."""
        return self.pool_systems or self.builder_systems


def parse_sops_recipients(value: Any) -> tuple[tuple[str, ...], str | None]:
    """``nixpush_sops_recipients``: a list of one-line names of master keys (``age1...``, a PGP
    fingerprint, a KMS ARN, ...); ``()`` when unset. The problem's text (after the key) when it
    is anything else, and then ``()``: no key is allowed."""
    if value is None:
        return (), None
    if isinstance(value, list | tuple) and all(
        isinstance(v, str) and v.strip() and "\n" not in v and "\0" not in v for v in value
    ):
        return tuple(v.strip() for v in value), None
    return (), (
        f"is {value!r}; set it to a list of the master keys besides yours that may read the "
        "push-key sops file (age recipients like 'age1...', PGP fingerprints), e.g. a backup "
        "key: ['age1...']"
    )


class _Reader:
    """Reads one host's data, collecting every problem instead of stopping at the first."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.problems: list[str] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.host.name}: {key} {text}")

    def string(self, key: str) -> str | None:
        value = self.host.data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(key, f"is {value!r}, not a string; set it to a string")
            return None
        return value

    def positive_int(
        self, key: str, maximum: int | None = None, unit: str = "a whole number"
    ) -> int | None:
        return self.number(key, 1, maximum, unit)

    def whole_number(self, key: str, maximum: int, unit: str = "a whole number") -> int:
        """From 0 to ``maximum``; 0 when unset."""
        return self.number(key, 0, maximum, unit) or 0

    def number(self, key: str, minimum: int, maximum: int | None, unit: str) -> int | None:
        # `--data key=8` arrives as an int, but data written by hand or by other tools may be
        # the string "8"; accept both, reject bools (an int subclass) and anything else.
        value = self.host.data.get(key)
        if value is None:
            return None
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdecimal():
            number = int(value.strip())
        if number is None or number < minimum or (maximum is not None and number > maximum):
            wanted = (
                f"from {minimum} to {maximum}" if maximum is not None else f"of {minimum} or more"
            )
            self.problem(key, f"is {value!r}; set it to {unit} {wanted}")
            return None
        return number

    def seconds(self, key: str, default: int, maximum: int) -> int:
        """A duration in whole seconds, from 1 to ``maximum``; ``default`` when unset."""
        return self.positive_int(key, maximum, unit="a number of seconds") or default

    def boolean(self, key: str, default: bool = False, *, text: bool = True) -> bool:
        # `--data offline_ok=true` arrives as a bool; data written by hand may say "true"
        # (not for pyinfra's own keys: pyinfra would take the text "false" as true).
        value = self.host.data.get(key, default)
        if text and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.problem(key, f"is {value!r}; set it to True or False")
            return default
        return value

    def health_checks(self) -> tuple[HealthCheck, ...]:
        try:
            return tuple(
                merged_entries(
                    self.host,
                    "health_checks",
                    parse_check,
                    lambda c: c.name,
                    lambda c: f"defines check {c.name!r}",
                    lone_entry_ok=True,
                )
            )
        except FleetError as error:
            self.problems.extend(error.problems)
            return ()

    def secrets(self) -> tuple[Secret, ...]:
        try:
            return tuple(host_secrets(self.host))
        except FleetError as error:
            self.problems.extend(error.problems)
            return ()

    def schedule(self) -> Schedule:
        try:
            return parse_schedule(self.host.name, self.host.data.get("schedule"))
        except ScheduleError as error:
            self.problems.append(str(error))
            return Schedule(enabled=False)

    def margin(self, key: str) -> Margin:
        value = self.host.data.get(key)
        if value is None:
            return Margin.parse(DEFAULT_MIN_FREE_SPACE)
        if isinstance(value, str):
            try:
                return Margin.parse(value)
            except ValueError as error:
                problem = str(error)
        else:
            problem = "is not text"
        self.problem(
            key, f"{value!r} {problem}; set it to a size like '1G' or '500M', or a percentage "
            "of the store's filesystem like '5%'",
        )  # fmt: skip
        return Margin.parse(DEFAULT_MIN_FREE_SPACE)

    def keep_generations(self) -> int | None:
        value = self.host.data.get("keep_generations")
        if str(value).strip() == "1" and isinstance(value, int | str):
            # deploy_action=rollback goes back to the previous generation: keep it.
            self.problem(
                "keep_generations", "is 1, which leaves no generation to roll back to; set it "
                f"to 2 or more (at most {MAX_KEEP_GENERATIONS}), or leave it out to keep every "
                "generation",
            )  # fmt: skip
            return None
        # Bounded: the target compares it in sh, whose numbers stop at 2^63 (past it, dash and
        # bash disagree, and a failed comparison must never read as "delete").
        return self.number(
            "keep_generations", 2, MAX_KEEP_GENERATIONS, unit="a number of generations"
        )

    def sops_recipients(self) -> tuple[str, ...]:
        recipients, problem = parse_sops_recipients(self.host.data.get("nixpush_sops_recipients"))
        if problem is not None:
            self.problem("nixpush_sops_recipients", problem)
        return recipients

    def boot_dir(self, nix_system: str) -> str | None:
        if self.host.data.get("boot_dir") is None:
            # The Pis' NixOS boots with extlinux from /boot; an x86 host's loader is unknown.
            return "/boot" if nix_system in _EXTLINUX_SYSTEMS else None
        value = self.string("boot_dir")
        if value is None or not value.startswith("/") or "\n" in value:
            self.problem(
                "boot_dir", f"is {self.host.data.get('boot_dir')!r}; set it to the absolute "
                "path on the target whose nixos/ directory holds the kernels (e.g. /boot)",
            )  # fmt: skip
            return None
        return value.rstrip("/") or "/"

    def image_attr(self) -> str | None:
        value = self.string("image_attr")
        if value is not None and not _IMAGE_ATTR.fullmatch(value):
            self.problem(
                "image_attr",
                f"{value!r} is not an attribute name; set it to one under config.system.build, "
                "e.g. isoImage or sdImage",
            )
            return None
        return value

    def absolute_path(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and (not value.startswith("/") or "\n" in value):
            self.problem(key, f"is {value!r}; set it to an absolute path on the controller")
            return None
        return value

    def target_path(self, key: str) -> str | None:
        """An absolute one-line path on the target, not under ``/etc`` (NixOS owns it)."""
        value = self.string(key)
        if value is None:
            return None
        if not value.startswith("/") or not grammar.is_one_line(value) or value.endswith("/"):
            self.problem(key, f"is {value!r}; set it to an absolute file path on the target")
            return None
        if value == "/etc" or value.startswith("/etc/"):
            self.problem(key, f"is {value!r}, under /etc, which NixOS rewrites; set a path "
                         "under /var/lib")  # fmt: skip
            return None
        return value

    def path(self, key: str) -> str | None:
        """A path on the controller (``PATH_KEYS``): one line."""
        value = self.string(key)
        if value is not None and not grammar.is_one_line(value):
            self.problem(key, f"{value!r} has a line break or NUL; set it to a one-line path")
            return None
        return value

    def nix_system(self) -> str:
        """``nix_system``, one of ``KNOWN_SYSTEMS``; "" when missing."""
        nix_system = self.string("nix_system")
        if nix_system is None:
            if self.host.data.get("nix_system") in (None, ""):
                self.problem(
                    "nix_system", f"is missing; set it to one of: {_listed(KNOWN_SYSTEMS)}"
                )
            return ""
        if nix_system not in KNOWN_SYSTEMS:
            self.problem(
                "nix_system",
                f"{nix_system!r} is unknown; set it to one of: {_listed(KNOWN_SYSTEMS)}",
            )
        return nix_system

    def deploy_action(self) -> Action:
        """``deploy_action``; switch when unset or wrong."""
        if self.host.data.get("deploy_action") == "":
            self.problem(
                "deploy_action",
                f"is empty; leave it out for switch, or set one of: {_listed(ACTIONS)}",
            )
        action_name = self.string("deploy_action") or Action.SWITCH.value
        if action_name not in DEPLOY_ACTIONS:
            self.problem(
                "deploy_action",
                f"{action_name!r} is not an action; set it to one of: {_listed(DEPLOY_ACTIONS)}",
            )
            return Action.SWITCH
        return Action(action_name)

    def host_name(self) -> None:
        """The host's name becomes file names, Nix attributes and SSH aliases. Names pyinfra's
        other connectors make (``@local``) are theirs, not checked."""
        host = self.host
        named_by_user = not host.name.startswith("@") or issubclass(
            host.connector_cls, SSHConnector
        )
        if named_by_user and not grammar.is_host_name(host.name):
            self.problems.append(
                f"{host.name!r}: the host name is not letters, digits, '.', '_' and '-' "
                "starting with a letter or digit; rename the host (its name becomes file "
                "names, Nix attributes and SSH aliases)"
            )

    def hostname(self) -> str | None:
        """``ssh_hostname``: one address, or (before the inventory chose one) a list."""
        value = self.host.data.get("ssh_hostname")
        if isinstance(value, (list, tuple)):
            for address in value:
                if isinstance(address, str):
                    self.address(address)
                else:
                    self.problem("ssh_hostname", f"holds {address!r}, not an address string")
            self.problem(
                "ssh_hostname",
                f"is the list {list(value)!r}, but no address was chosen from it; build the "
                "inventory's groups with pin_host_keys or choose_addresses "
                "(operations/trust/hostkeys.py), which try them in order",
            )
            return None
        return self.string("ssh_hostname")

    def addresses(self, chosen: str | None) -> tuple[str, ...]:
        """``ssh_addresses`` (``choose_addresses`` sets it): every address, in order, each one
        as ``ssh_hostname`` must be, the chosen one among them."""
        value = self.host.data.get("ssh_addresses")
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
            self.problem("ssh_addresses", f"is {value!r}, not a list of addresses")
            return ()
        for address in value:
            self.address(address)
        if chosen not in value:
            self.problem(
                "ssh_addresses",
                f"{list(value)!r} lacks ssh_hostname {chosen!r}; give ssh_hostname the list "
                "instead and let choose_addresses set both",
            )
        return tuple(value)

    def address(self, value: str | None) -> None:
        """``ssh_hostname``: a DNS name or an IPv4 address, nothing an ssh option or URL reads."""
        if value is None:
            return
        if _UNSAFE_ADDRESS.search(value):
            problem = "has whitespace, '@' or a leading '-'; set the bare address"
        elif (wrong := grammar.address_problem(value)) is not None:
            problem = (
                f"{wrong}; set the bare address: a DNS name or an IPv4 address (no user@, "
                ":port, path or ?options)"
            )
        else:
            return
        self.problem("ssh_hostname", f"{value!r} {problem}")

    def account(self) -> str | None:
        """``ssh_user``: an account name."""
        value = self.string("ssh_user")
        if value is None:
            return None
        if _UNSAFE_ADDRESS.search(value):
            self.problem(
                "ssh_user",
                f"{value!r} has whitespace, '@' or a leading '-'; set the bare user name",
            )
        elif not grammar.is_account_name(value):
            self.problem(
                "ssh_user", f"{value!r} is not an account name; set the bare user name "
                "(a letter or _, then letters, digits, '_', '.', '-')",
            )  # fmt: skip
        return value

    def systems(self, key: str) -> tuple[str, ...]:
        value = self.host.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):  # `--data binfmt_emulated_systems=aarch64-linux,armv7l-linux`
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
            self.problem(key, f"is {value!r}; set it to a list of Nix systems")
            return ()
        for system in value:
            if system not in KNOWN_SYSTEMS:
                self.problem(key, f"has unknown system {system!r}; known: {_listed(KNOWN_SYSTEMS)}")
        return tuple(s for s in value if s in KNOWN_SYSTEMS)

    def names(self, key: str, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        """A list of plain names (``remote_builders``, ``builder_features``); () when unset."""
        value = self.host.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):  # `--data remote_builders=bld,pi9`
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and pattern.fullmatch(v) for v in value
        ):
            self.problem(key, f"is {value!r}; set it to a list of {what}")
            return ()
        return tuple(dict.fromkeys(value))


_FEATURE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def data_sources(host: Host, key: str) -> list[tuple[str, Any, bool]]:
    """
    ``(where, value, overrides)`` of data ``key`` for each place ``host``'s data can set it:
    all data, each group the host is in (its roots), host data, ``--data``, in that order.
    pyinfra keeps only the last group's value of a key; list-valued keys that roots add to
    (``secrets``, ``health_checks``) merge these instead.
    """
    inventory = host.inventory
    places: list[tuple[str, Mapping[str, Any], bool]] = [("all data", inventory.data, False)]
    places += [
        (f"group {group}", inventory.group_data.get(group, {}), False)
        for group in dict.fromkeys(str(g) for g in host.groups)
    ]
    places += [
        ("host data", inventory.host_data.get(host.name, {}), True),
        ("--data", inventory.override_data, True),
    ]
    return [(where, data[key], overrides) for where, data, overrides in places if key in data]


def merged_entries(
    host: Host,
    key: str,
    parse: Callable[[Any], tuple[E | None, list[str]]],
    identity: Callable[[E], str],
    claim: Callable[[E], str],
    *,
    lone_entry_ok: bool = False,
) -> list[E]:
    """
    The entries of list-valued data ``key`` (``secrets``, ``health_checks``) from every place
    ``host``'s data sets it (``data_sources``), parsed and merged by ``identity``: host data and
    ``--data`` replace an entry with the same identity; two groups declaring one differently is
    an error (``claim(entry)`` says what it declares, e.g. "installs /x"). Raises ``FleetError``
    naming every problem, the host, the entry and the fix.
    """
    merged: dict[str, tuple[str, E]] = {}
    problems: list[str] = []
    for where, value, overrides in data_sources(host, key):
        if lone_entry_ok and isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list | tuple):
            problems.append(f"{host.name}: {key} in {where} is {value!r}; set it to a list")
            continue
        for index, raw in enumerate(value):
            entry, entry_problems = parse(raw)
            label = f"{host.name}: {key}[{index}] in {where}"
            problems.extend(f"{label} {problem}" for problem in entry_problems)
            if entry is None:
                continue
            previous = merged.get(identity(entry))
            if previous is not None and previous[1] != entry and not overrides:
                problems.append(
                    f"{label} {claim(entry)} differently from {previous[0]}; "
                    "declare it in one group, or set it in host data to override"
                )
                continue
            merged[identity(entry)] = (where, entry)
    if problems:
        raise FleetError(problems)
    return [entry for _, entry in merged.values()]


def host_secrets(host: Host) -> list[Secret]:
    """
    Every secret ``host`` gets, merged from all the places its ``secrets`` can be set (what
    ``HostSpec.secrets`` holds).

    pyinfra replaces a data key set by two groups (the later group wins), which would give a
    host in ``network`` and ``server`` only one root's secrets. So the lists are merged here:
    the ``secrets`` of ``all`` data, of every group the host is in (its roots), of its host data
    and of ``--data``, in that order, deduplicated by ``dest``. Host data and ``--data`` replace
    an entry with the same ``dest``; two groups declaring one ``dest`` differently is an error.
    Raises ``FleetError`` naming the host, the entry and the fix.

    + host: a pyinfra ``Host``

    .. code:: python

        [s.dest for s in host_secrets(inventory.get_host("nas"))]
        # ["/root/.nixpush/deploy_ed25519", "/root/.nixpush/signing-key.sec"]
    """
    return merged_entries(
        host, "secrets", parse_secret, lambda s: s.dest, lambda s: f"installs {s.dest}"
    )


def inventory_file(host: Host) -> str:
    """
    The fleet's inventory deploys/nixos_config.py reads: ``nixpush_inventory`` (default
    ``inventory.py``), a path relative to where pyinfra runs or absolute. ``FleetError`` when
    it is not a one-line path.

    + host: the pyinfra ``Host`` the deploy runs on (``@local``)
    """
    read = _Reader(host)
    path = read.path("nixpush_inventory")
    if read.problems:
        raise FleetError(read.problems)
    return path or DEFAULT_INVENTORY


def _listed(names: Iterable[str]) -> str:
    return ", ".join(names) or "(none)"


def _read_host(host: Host) -> tuple[HostSpec, list[str]]:
    """The host's spec (with neutral values where data is wrong) and its problems."""
    read = _Reader(host)

    nix_system = read.nix_system()
    deploy_action = read.deploy_action()

    is_image = IMAGE_CONNECTOR_GROUP in host.groups
    # A host naming itself builds its own system (the NAS): evaluated, built and activated
    # there, nothing copied. An image cannot build itself: nothing runs on it.
    builder_host = read.string("builder_host")
    if is_image and builder_host in (None, host.name):
        read.problem(
            "builder_host",
            f"is {builder_host!r}, but an image is built on another host; "
            "set builder_host to the host that builds it (e.g. nas)",
        )

    ssh_hostname = read.hostname()
    ssh_addresses = read.addresses(ssh_hostname)
    listed = isinstance(host.data.get("ssh_hostname"), (list, tuple))  # refused above
    if builder_host is not None and ssh_hostname is None and not is_image and not listed:
        read.problem(
            "ssh_hostname",
            f"is missing, so builder {builder_host!r} has no address to push to; "
            "set ssh_hostname to the target's address",
        )

    for key in ("flake", "nixos_config"):
        value = read.string(key)
        if value is not None and _UNSAFE_REF.search(value):
            read.problem(
                key, f"{value!r} has whitespace, a leading '-', '#' or '\"'; write the bare "
                "flake reference or attribute name (nixpush adds '#nixosConfigurations...')",
            )  # fmt: skip
    read.host_name()
    read.address(ssh_hostname)
    ssh_user = read.account()
    paths = {key: read.path(key) for key in PATH_KEYS}
    host_key = read.string("ssh_host_key")
    if host_key is not None and not grammar.is_host_key(host_key):
        read.problem(
            "ssh_host_key", f"{host_key!r} is not an SSH public key 'TYPE BASE64 [comment]'; "
            "copy it from `ssh-keyscan -p PORT -t ed25519 HOST` (without the host name)",
        )  # fmt: skip
    builder_user = read.string("builder_user")
    if builder_user is not None and (
        builder_user == "root" or not ACCOUNT_NAME.fullmatch(builder_user)
    ):
        read.problem(
            "builder_user", f"{builder_user!r} is not a dedicated account name; set it to an "
            "unprivileged account like 'nix-ssh' (root would give every pulling Pi root)",
        )  # fmt: skip
    read.problems.extend(_misspelt_keys(host))

    spec = HostSpec(
        name=host.name,
        roots=tuple(root for root in ROOTS if root in host.groups),
        nix_system=nix_system,
        flake=read.string("flake"),
        nixos_config=read.string("nixos_config") or host.name,
        builder_host=builder_host,
        builder_user=read.string("builder_user"),
        builder_port=read.positive_int("builder_port", _MAX_PORT),
        binfmt_emulated_systems=read.systems("binfmt_emulated_systems"),
        # 0: a builder with a pool builds nothing itself (checked in _pool_problems).
        nix_max_jobs=read.number("nix_max_jobs", 0, None, "a whole number"),
        ssh_hostname=ssh_hostname,
        ssh_addresses=ssh_addresses,
        provenance_file=read.target_path("provenance_file") or DEFAULT_PROVENANCE_FILE,
        ssh_port=read.positive_int("ssh_port", _MAX_PORT) or 22,
        ssh_user=ssh_user,
        ssh_host_key=read.string("ssh_host_key"),
        deploy_action=deploy_action,
        max_ssh_sessions=read.positive_int("max_ssh_sessions", _MAX_SESSIONS)
        or DEFAULT_MAX_SESSIONS,
        max_parallel_copies=read.positive_int("max_parallel_copies") or DEFAULT_MAX_PARALLEL_COPIES,
        build_timeout=read.positive_int("build_timeout") or DEFAULT_BUILD_TIMEOUT,
        copy_timeout=read.positive_int("copy_timeout") or DEFAULT_COPY_TIMEOUT,
        offline_ok=read.boolean("offline_ok"),
        is_image=is_image,
        image_attr=read.image_attr(),
        image_dest=read.absolute_path("image_dest"),
        sudo=read.boolean("_sudo", text=False),
        rollback=read.boolean("rollback", True),
        confirm_timeout=read.seconds(
            "confirm_timeout", DEFAULT_CONFIRM_TIMEOUT, _MAX_SAFETY_SECONDS
        ),
        activation_timeout=read.seconds(
            "activation_timeout", DEFAULT_ACTIVATION_TIMEOUT, _MAX_SAFETY_SECONDS
        ),
        health_checks=read.health_checks(),
        schedule=read.schedule(),
        deploy_wave=read.whole_number("deploy_wave", _MAX_WAVE),
        wave_soak=read.whole_number("wave_soak", _MAX_SAFETY_SECONDS, unit="a number of seconds"),
        min_free_space=read.margin("min_free_space"),
        boot_dir=read.boot_dir(nix_system),
        keep_generations=read.keep_generations(),
        gc_after_deploy=read.boolean("gc_after_deploy"),
        substitute_on_target=read.boolean("substitute_on_target"),
        nixpush_sops_recipients=read.sops_recipients(),
        secrets=read.secrets(),
        sops_file=paths["sops_file"],
        nixpush_sops_file=paths["nixpush_sops_file"],
        nixos_fragments_dir=paths["nixos_fragments_dir"] or DEFAULT_FRAGMENTS_DIR,
        remote_builders=read.names("remote_builders", "inventory host names", _FEATURE),
        pool_systems=read.systems("builder_systems"),
        speed_factor=read.positive_int("speed_factor", unit="a whole number") or 1,
        builder_features=read.names("builder_features", "Nix feature names", _FEATURE),
        reboot=parse_reboot(read.host.data.get, read.problem),
    )
    return spec, read.problems


def host_spec(host: Host) -> HostSpec:
    """
    Parse one host's data into a ``HostSpec``; raise ``FleetError`` naming every bad key.
    Checks that need the rest of the fleet (groups, builders) are in ``fleet_errors``.

    + host: a pyinfra ``Host``

    .. code:: python

        spec = host_spec(host)
        spec.nix_system  # "aarch64-linux"
    """
    spec, problems = _read_host(host)
    if problems:
        raise FleetError(problems)
    return spec


@functools.cache
def _known_keys() -> frozenset[str]:
    """Every data key nixpush or pyinfra knows; pyinfra's connectors are read once (listing
    their entry points costs milliseconds, and every key of every host asks)."""
    known = set(NIXPUSH_KEYS) | set(PYINFRA_KEYS)
    connectors: Any = get_all_connectors  # untyped in pyinfra
    for connector in connectors().values():
        known |= set(getattr(connector, "data_meta", None) or {})
    return frozenset(known)


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, swaps."""
    rows = [list(range(len(b) + 1))]
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            cost = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (x != y))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                cost = min(cost, rows[-2][j - 2] + 1)
            row.append(cost)
        rows.append(row)
    return rows[-1][-1]


def misspelt(key: str) -> str | None:
    """The known key ``key`` is a typo of: ``misspelt("builder_hots") == "builder_host"``;
    None for known keys, pyinfra's (``_sudo``, ``ssh_*``) and keys nothing resembles."""
    known = _known_keys()
    if key in known or key.startswith("_"):
        return None
    candidates = [*NIXPUSH_KEYS, *PYINFRA_KEYS]
    distance, closest = min((_edits(key, name), name) for name in candidates)
    return closest if distance <= (1 if len(closest) <= 6 else 2) else None


def _misspelt_keys(host: Host) -> list[str]:
    host_data: Any = host.data  # HostData.dict is untyped in pyinfra
    data: dict[str, Any] = host_data.dict()
    problems = []
    for key in sorted(str(k) for k in data):
        closest = misspelt(key)
        if closest is not None:
            problems.append(
                f"{host.name}: {key} is not a nixpush or pyinfra data key; did you mean "
                f"{closest}? Rename it (or, if it is your own, give it a name less like {closest})"
            )
    return problems


def _file_group(inventory: Inventory) -> str | None:
    # pyinfra's CLI puts every host of an inventory file into one more group named after the
    # file (inventory.py -> "inventory"), appended after the file's own groups. The file's name
    # is not kept anywhere, so recognise the group by where it sits: last in every host's
    # groups. A mistyped group can't sit there, since the file group always comes after it.
    # (An inventory file named after a root, e.g. server.py, would silently put every host in
    # that root: pyinfra's doing, so don't name inventory files after roots.)
    lasts = {tuple(_own_groups(host)[-1:]) for host in inventory}
    if len(lasts) != 1:
        return None
    (last,) = lasts
    return None if not last or last[0] in ROOTS else last[0]


def _own_groups(host: Host) -> list[str]:
    # Connectors add groups of their own, named after them ("@local", "@docker"), and for those
    # hosts pyinfra lists the inventory groups twice; neither is the user's doing.
    return [str(group) for group in dict.fromkeys(host.groups) if not str(group).startswith("@")]


def _group_problems(inventory: Inventory) -> list[str]:
    # Groups that may hold hosts without being roots: "all" (in API-made inventories), the
    # inventory file's own group and connectors' groups (left out by _own_groups).
    allowed = {"all", _file_group(inventory)}
    problems = []
    for host in inventory:
        for group in _own_groups(host):
            if group in ROOTS or group in allowed:
                continue
            if group == IMAGES_GROUP and IMAGE_CONNECTOR_GROUP in host.groups:
                continue
            problems.append(
                f"{host.name}: group {group!r} is not a root; "
                f"move the host into one of the roots: {_listed(ROOTS)}"
            )
    return problems


def _builder_problems(spec: HostSpec, specs: Mapping[str, HostSpec]) -> list[str]:
    name, builder_name = spec.name, spec.builder_host
    if builder_name is None or builder_name == name:
        return []
    builder = specs.get(builder_name)
    if builder is None:
        others = [other for other in specs if other != name]
        return [
            f"{name}: builder_host {builder_name!r} is not in the inventory; "
            f"set builder_host to one of: {_listed(others)}"
        ]
    if builder.builder_host == name and builder.builder_host != builder_name:
        return [
            f"{name}: builder_host {builder_name!r} has builder_host {name!r}: two hosts that "
            "build each other are never built; set one's builder_host to a host that builds "
            "its own system, or remove it"
        ]
    if builder.builder_host not in (None, builder_name):  # a builder may build itself
        return [
            f"{name}: builder_host {builder_name!r} is itself built on "
            f"{builder.builder_host!r}, a chain nixpush does not follow; set {name}'s "
            f"builder_host to a host without builder_host (e.g. {builder.builder_host!r}), or "
            f"remove {builder_name}'s"
        ]
    if spec.nix_system not in KNOWN_SYSTEMS or builder.nix_system not in KNOWN_SYSTEMS:
        return []  # already reported as a nix_system problem
    if spec.nix_system in builder.builder_systems:
        return []
    return [
        f"{name}: builder_host {builder_name!r} cannot build nix_system {spec.nix_system!r} "
        f"(it builds: {_listed(builder.builder_systems)}); add {spec.nix_system!r} to "
        f"{builder_name}'s binfmt_emulated_systems and run deploys/nas.py"
    ]


def _pool_problems(spec: HostSpec, specs: Mapping[str, HostSpec]) -> list[str]:
    """A builder's ``remote_builders``: hosts of the inventory that can be reached, verified
    and build what they offer."""
    problems: list[str] = []
    if spec.pool_systems and not set(spec.pool_systems) <= set(spec.builder_systems):
        problems.append(
            f"{spec.name}: builder_systems {list(spec.pool_systems)!r} has systems it does not "
            f"build (it builds: {_listed(spec.builder_systems)}); remove them, or add them to "
            "its binfmt_emulated_systems"
        )
    if spec.nix_max_jobs == 0 and not spec.remote_builders:
        problems.append(
            f"{spec.name}: nix_max_jobs is 0, so it builds nothing itself, and it has no "
            "remote_builders to build for it; set it to 1 or more, or give it a pool"
        )
    for name in spec.remote_builders:
        member = specs.get(name)
        if member is None or member.is_image or name == spec.name:
            others = [m for m, s in specs.items() if m != spec.name and not s.is_image]
            why = "is the builder itself" if name == spec.name else "is not in the inventory"
            problems.append(
                f"{spec.name}: remote_builders names {name!r}, which {why}; name hosts of the "
                f"inventory that build for it, among: {_listed(others)}"
            )
            continue
        if member.nix_max_jobs == 0:
            problems.append(
                f"{name}: nix_max_jobs is 0, so as a member of {spec.name}'s pool it would take "
                "no build; set it to 1 or more, or take it out of remote_builders"
            )
        if member.remote_builders:
            problems.append(
                f"{spec.name}: remote_builders names {name!r}, which has a pool of its own, a "
                f"chain nixpush does not follow; remove {name}'s remote_builders"
            )
        if member.ssh_hostname is None:
            problems.append(
                f"{name}: ssh_hostname is missing, so {spec.name} can't reach it as a remote "
                "builder; set it to the member's address"
            )
        if member.ssh_host_key is None:
            problems.append(
                f"{name}: ssh_host_key is missing, so {spec.name} can't verify it as a remote "
                "builder; set it to its public host key (`ssh-keyscan -t ed25519 HOST`, "
                "checked out of band)"
            )
    return problems


def read_fleet(inventory: Inventory) -> tuple[dict[str, HostSpec], list[str]]:
    """Every host's spec by name, and every problem in the fleet's data (``fleet_errors``):
    one pass over the inventory."""
    specs: dict[str, HostSpec] = {}
    problems = _group_problems(inventory)
    for host in inventory:
        spec, host_problems = _read_host(host)
        specs[host.name] = spec
        problems.extend(host_problems)
    for spec in specs.values():
        problems.extend(_builder_problems(spec, specs))
        problems.extend(_pool_problems(spec, specs))
    problems.extend(_address_problems(inventory, specs))
    return specs, problems


def _address_problems(inventory: Inventory, specs: Mapping[str, HostSpec]) -> list[str]:
    """Targets sharing an address; IPv6 and unchecked host keys where nixpush pushes or builds."""
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for spec in specs.values():
        if spec.is_target and spec.ssh_hostname is not None:
            address = (spec.ssh_hostname.lower(), spec.ssh_port)
            other = seen.setdefault(address, spec.name)
            if other != spec.name:
                problems.append(
                    f"{spec.name}: ssh_hostname and ssh_port {spec.ssh_hostname}:{spec.ssh_port} "
                    f"are also {other}'s, and the builder's known_hosts holds one host key per "
                    "address; give each target its own address or port"
                )
    involved = {
        *builders(specs),
        *pool_members(specs),
        *(name for name, spec in specs.items() if spec.is_target),
    }
    for host in inventory:
        problems.extend(_host_key_problems(host))
        if host.name not in involved:
            continue
        hostname = specs[host.name].ssh_hostname or ""
        if grammar.is_ipv6(hostname):
            problems.append(
                f"{host.name}: ssh_hostname {hostname!r} is an IPv6 address, which nixpush does "
                "not support (Nix's ssh-ng URLs and known_hosts need it bracketed); use a DNS "
                "name or an IPv4 address"
            )
    return problems


def _host_key_problems(host: Host) -> list[str]:
    """Host keys accepted blind on a host nixpush reaches over SSH (secrets, pushes and
    confirmations go to whoever answers): unset is pyinfra's accept-new."""
    checking = host.data.get("ssh_strict_host_key_checking")
    if not issubclass(host.connector_cls, SSHConnector) or checking == "yes":
        return []
    if host.data.get(INSECURE_KEY) is True:
        return []
    how = (
        "is unset, which pyinfra takes as 'accept-new':"
        if checking is None
        else f"is {checking!r}, so"
    )
    return [
        f"{host.name}: ssh_strict_host_key_checking {how} an impostor could take this host's "
        'place when nixpush connects to it; set it to "yes" (the host\'s key in its '
        "known_hosts file, or pinned from its ssh_host_key by "
        "operations.trust.hostkeys.pin_host_keys in the inventory), or set "
        f"{INSECURE_KEY} = True to accept that"
    ]


def fleet_errors(inventory: Inventory) -> list[str]:
    """
    Every problem in the inventory's nixpush data, one line each, naming host, key and fix;
    an empty list when the fleet is sound.

    + inventory: a pyinfra ``Inventory`` (``state.inventory`` in deploy code)
    """
    return read_fleet(inventory)[1]


def check_fleet(inventory: Inventory) -> dict[str, HostSpec]:
    """
    The spec of every host by name, or ``FleetError`` listing every problem.

    + inventory: a pyinfra ``Inventory`` (``state.inventory`` in deploy code)

    .. code:: python

        specs = check_fleet(state.inventory)
        builder = specs[specs[host.name].builder_host]
    """
    specs, problems = read_fleet(inventory)
    if problems:
        raise FleetError(problems)
    return specs


def builders(specs: Mapping[str, HostSpec]) -> list[str]:
    """
    Hosts that build for others: named as a target's ``builder_host`` or emulating systems.

    + specs: ``check_fleet(...)``'s result

    .. code:: python

        builders(check_fleet(state.inventory))  # ["nas"]
    """
    named = {spec.builder_host for spec in specs.values()}
    return [name for name, spec in specs.items() if name in named or spec.binfmt_emulated_systems]


def pool_members(specs: Mapping[str, HostSpec]) -> list[str]:
    """
    Hosts in some builder's ``remote_builders``, in inventory order.

    + specs: ``check_fleet(...)``'s result

    .. code:: python

        pool_members(check_fleet(state.inventory))  # ["bld"]
    """
    named = {name for spec in specs.values() for name in spec.remote_builders}
    return [name for name in specs if name in named]
