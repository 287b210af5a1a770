"""
The push flow's values: what an action does, what deploying one target means, how a target
reaches its builder. Frozen and free of I/O; every other layer builds on them.

.. code:: python

    Action("switch").activates, Action("build").copies      # True, False
    Action("rollback").contacts_target                       # True: it runs on the target
    plan.up_to_date, plan.noop_reason
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from operations.core.boot import BootFiles

if TYPE_CHECKING:
    from pyinfra.api.host import Host

# Where a host shows what it runs, boots next, and whether systemd runs it (sd_booted()).
CURRENT_SYSTEM = "/run/current-system"
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
SYSTEMD_RUNNING = "/run/systemd/system"
# Present on NixOS only.
NIXOS_MARKER = "/etc/NIXOS"


class Action(StrEnum):
    """A ``deploy_action``, as for ``nixos-rebuild``; each knows what it builds, copies,
    activates and verifies."""

    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"
    BUILD = "build"
    ROLLBACK = "rollback"

    @property
    def contacts_target(self) -> bool:
        """Whether the run reaches the target at all (not for build: it may be off or away),
        so an unreachable target fails it."""
        return self is not Action.BUILD

    @property
    def builds(self) -> bool:
        """Whether the system comes from the builder (not for a rollback: it is on the target)."""
        return self is not Action.ROLLBACK

    @property
    def copies(self) -> bool:
        """Whether the closure goes to the target (not for build, nor a rollback)."""
        return self not in (Action.BUILD, Action.ROLLBACK)

    @property
    def activates(self) -> bool:
        """Whether ``switch-to-configuration`` runs (switch, boot, test; a rollback switches)."""
        return self in (Action.SWITCH, Action.BOOT, Action.TEST, Action.ROLLBACK)

    @property
    def sets_profile(self) -> bool:
        """Whether the system profile (what boots next) moves to the new system."""
        return self in (Action.SWITCH, Action.BOOT, Action.ROLLBACK)

    @property
    def makes_current(self) -> bool:
        """Whether the new system runs afterwards (``/run/current-system``)."""
        return self in (Action.SWITCH, Action.TEST, Action.ROLLBACK)

    @property
    def confirmable(self) -> bool:
        """Whether the new system runs before anything is confirmed, so health checks and a
        new login can confirm it and the target can roll back without one (not for boot:
        nothing can be confirmed without a reboot)."""
        return self.activates and self.makes_current


ACTIONS: tuple[str, ...] = tuple(action.value for action in Action)


@dataclass(frozen=True)
class Plan:
    """
    What deploying one target means, computed once per run.

    + target, builder: inventory names
    + attr: the flake attribute of the toplevel
    + desired: its store path, as the builder evaluates it
    + current: what ``/run/current-system`` points at on the target (None: nothing)
    + profile: what the system profile points at (what boots next)
    + action: the ``Action``
    + built: whether the builder already has ``desired`` (looked up only when it matters)
    + derivation: the ``.drv`` that builds ``desired`` (None: build from ``attr``)
    + pending: another activation the target has not finished (who, when), else None
    + booted: the boot files of the system the target booted (None: unknown, or none)
    + new_boot: the desired system's boot files (None: not known yet: read after the build)
    """

    target: str
    builder: str
    attr: str
    desired: str
    current: str | None
    profile: str | None
    action: Action
    built: bool = False
    derivation: str | None = None
    pending: str | None = None
    booted: BootFiles | None = None
    new_boot: BootFiles | None = None

    @property
    def reboot_changes(self) -> tuple[str, ...] | None:
        """What only a reboot brings into effect once the desired system runs (empty: nothing;
        None: not known, e.g. not built yet): ``("kernel A → B",)``."""
        if self.booted is None or self.new_boot is None:
            return None
        return self.booted.changes_to(self.new_boot)

    @property
    def up_to_date(self) -> bool:
        """Nothing to do: the target already runs (or boots, or has built) the desired system,
        and no other activation is pending there (it may still roll the links back)."""
        if self.action is Action.BUILD:
            return self.built
        if self.pending:
            return False
        if self.action.makes_current and self.current != self.desired:
            return False
        if self.action.sets_profile and self.profile != self.desired:
            return False
        return (
            self.action.makes_current or self.action.sets_profile or (self.current == self.desired)
        )

    @property
    def noop_reason(self) -> str:
        if self.action is Action.BUILD:
            return f"{self.builder} has already built {self.desired}"
        if self.action is Action.BOOT:
            return f"{self.target} already boots {self.desired}"
        return f"{self.target} already runs {self.desired}"

    @property
    def before(self) -> str | None:
        """What the action replaces: the profile for boot, else the running system."""
        return self.profile if self.action is Action.BOOT else self.current


DEFAULT_CONFIRM_TIMEOUT = 30
DEFAULT_ACTIVATION_TIMEOUT = 600


@dataclass(frozen=True)
class Safety:
    """
    How an activation is guarded.

    + rollback: the target rolls back unless confirmed (never for ``boot``)
    + confirm_timeout: seconds the target waits for the confirmation after activating
    + activation_timeout: seconds ``switch-to-configuration`` may take
    """

    rollback: bool = True
    confirm_timeout: int = DEFAULT_CONFIRM_TIMEOUT
    activation_timeout: int = DEFAULT_ACTIVATION_TIMEOUT


# The default max_parallel_copies (4) and one session for progress reads, below sshd's default
# MaxSessions (10): pyinfra keeps one more channel open for SFTP once it has uploaded a file,
# and a human's multiplexed `ssh` needs room too.
DEFAULT_MAX_SESSIONS = 5
# A builder's copy concurrency (its uplink is shared) and step limits, in seconds.
DEFAULT_MAX_PARALLEL_COPIES = 4
DEFAULT_BUILD_TIMEOUT = 4 * 3600
DEFAULT_COPY_TIMEOUT = 3600


@dataclass(frozen=True)
class Builder:
    """How a target's operations reach its builder: the inventory host, and whether commands
    there need sudo (pyinfra does not apply the target operation's ``_sudo`` to them)."""

    host: Host
    sudo: bool
    # From the builder's spec (fleet.py, push.plan.builder_of): max_parallel_copies,
    # build_timeout, copy_timeout, and max_ssh_sessions (copies hold sessions).
    max_parallel_copies: int = DEFAULT_MAX_PARALLEL_COPIES
    max_ssh_sessions: int = DEFAULT_MAX_SESSIONS
    build_timeout: int = DEFAULT_BUILD_TIMEOUT
    copy_timeout: int = DEFAULT_COPY_TIMEOUT


@dataclass(frozen=True)
class ImagePlan:
    """
    What building one image means, computed once per run (deploys/image.py).

    + name: the image host (or the host whose image was asked for)
    + builder: the inventory name of the host that builds it
    + attr: the flake attribute of the image
    + path: its store path, as the builder evaluates it
    + built: whether the builder has it already
    + dest: where the controller keeps the image file (None: it stays on the builder)
    + at_dest: whether ``dest`` already holds the same file (same sha256)
    """

    name: str
    builder: str
    attr: str
    path: str
    built: bool
    dest: str | None = None
    at_dest: bool = False

    @property
    def up_to_date(self) -> bool:
        """Nothing to build or copy."""
        return self.built and (self.dest is None or self.at_dest)

    @property
    def noop_reason(self) -> str:
        where = f", and {self.dest} holds it" if self.dest else ""
        return f"{self.builder} has already built {self.path}{where}"

    @property
    def todo(self) -> str:
        """What a run does, for ``--dry``: ``build /nix/store/... on nas, copy it to ...``."""
        steps = [] if self.built else [f"build {self.attr} ({self.path}) on {self.builder}"]
        if self.dest and not self.at_dest:
            steps.append(f"copy its image file to {self.dest}")
        return ", ".join(steps) or "nothing"


# What a target's store keeps free after a copy unless min_free_space says otherwise: a new
# system's closure is often hundreds of MiB, and Nix needs room for its database besides.
DEFAULT_MIN_FREE_SPACE = "1G"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


@dataclass(frozen=True)
class Margin:
    """How much a target's store keeps free after a copy: bytes, or a percentage of its
    filesystem (``min_free_space`` data, ``"1G"``, ``"500M"``, ``"5%"``)."""

    text: str
    size: int = 0
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Margin:
        """``Margin.parse("1G").size == 1024**3``; ``ValueError`` naming what is wrong."""
        value = text.strip()
        percent = _PERCENT.fullmatch(value)
        if percent is not None:
            number = float(percent.group(1))
            if number >= 100:
                raise ValueError("is 100% or more, which no filesystem ever has free")
            return cls(value, percent=number)
        size = _SIZE.fullmatch(value)
        if size is None:
            raise ValueError("is neither a size nor a percentage")
        return cls(value, size=int(float(size.group(1)) * _UNITS[size.group(2).upper()]))

    def of(self, total: int) -> int:
        """The bytes kept free on a filesystem of ``total`` bytes."""
        return int(total * self.percent / 100) if self.percent is not None else self.size


# A sops key path: ("headscale", "pre_auth"); an int indexes a list.
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Plaintext:
    """
    A decrypted value. Its ``repr`` and ``str`` are a mask naming where it came from, so it
    can't leak through a log line, an f-string or an exception by accident.

    .. code:: python

        str(value)  # "<secret headscale/pre_auth>"
        value.reveal()  # the text itself
    """

    label: str
    _text: str = field(repr=False)

    def reveal(self) -> str:
        """The decrypted text: hand it to a process's stdin and nowhere else."""
        return self._text

    @property
    def sha256(self) -> str:
        """Hex sha256 of the text's UTF-8 bytes, what ``sha256sum`` prints for the file."""
        return hashlib.sha256(self._text.encode()).hexdigest()

    def __str__(self) -> str:
        return f"<secret {self.label}>"

    def __repr__(self) -> str:
        return f"Plaintext(<secret {self.label}>)"
