"""
Build a NixOS system on its builder, copy its closure to the target, activate it there.

The push flow of DESIGN.md, one operation a step, each driven by a ``Plan`` that the deploy
file makes once per target at prepare time (``plan_deploy``): the desired toplevel, evaluated
on the builder, against what the target runs now. A target already on the desired system gets
no build, no copy and no activation: every step says so with ``host.noop``.

Steps that act on the builder run as ``FunctionCommand`` on the target's operation, through the
builder's own pyinfra connection; pyinfra does not apply the operation's ``_sudo`` to those, so
``builder_sudo`` is passed explicitly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gevent.lock import Semaphore
from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.secrets import SIGNING_KEY_PATH
from operations.ssh import SSH_OPTIONS
from operations.summary import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

CURRENT_SYSTEM = "/run/current-system"
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
NIX = ("nix", "--extra-experimental-features", QuoteString("nix-command flakes"))
ACTIVATING = ("switch", "boot", "test")
_SIMPLE_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")


class DeployFailed(Exception):
    """A step failed on one host; the message names the host, the cause and the fix."""


# -- facts -----------------------------------------------------------------------------


class StorePathLink(FactBase[str | None]):
    """
    The store path a link resolves to, or None when it is missing:
    ``host.get_fact(StorePathLink, path="/run/current-system")``.
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "if [ -e", QuoteString(path), "]; then readlink -f", QuoteString(path), "; fi"
        )

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


# -- planning --------------------------------------------------------------------------


def toplevel_attr(flake: str, config: str) -> str:
    """``toplevel_attr("path:/f", "pi4") == "path:/f#nixosConfigurations.pi4.config.system..."``."""
    name = config if _SIMPLE_ATTR.match(config) else json.dumps(config)
    return f"{flake}#nixosConfigurations.{name}.config.system.build.toplevel"


@dataclass(frozen=True)
class Plan:
    """
    What deploying one target means, computed once per run.

    + target, builder: inventory names
    + attr: the flake attribute of the toplevel
    + desired: its store path, as the builder evaluates it
    + current: what ``/run/current-system`` points at on the target (None: nothing)
    + profile: what the system profile points at (what boots next)
    + action: switch, boot, test, dry-activate or build
    + built: whether the builder already has ``desired`` (looked up only when it matters)
    """

    target: str
    builder: str
    attr: str
    desired: str
    current: str | None
    profile: str | None
    action: str
    built: bool = False

    @property
    def up_to_date(self) -> bool:
        """Nothing to do: the target already runs (or boots, or has built) the desired system."""
        if self.action == "build":
            return self.built
        if self.action == "boot":
            return self.profile == self.desired
        if self.action == "switch":
            return self.current == self.desired and self.profile == self.desired
        return self.current == self.desired

    @property
    def noop_reason(self) -> str:
        if self.action == "build":
            return f"{self.builder} has already built {self.desired}"
        if self.action == "boot":
            return f"{self.target} already boots {self.desired}"
        return f"{self.target} already runs {self.desired}"

    @property
    def copies(self) -> bool:
        return self.action != "build"


# Per run, on the controller: deploy code runs once per host and op bodies run twice, so
# evaluations are cached, and builds are serialised per store path (many targets may share
# one configuration; it is built once).
_evaluated: dict[tuple[str, str], str] = {}
_built: set[tuple[str, str]] = set()
_locks: dict[tuple[str, str], Semaphore] = {}


def _lock(key: tuple[str, str]) -> Semaphore:
    return _locks.setdefault(key, Semaphore())


def run_on(
    target: Host,
    command: StringCommand,
    *,
    sudo: bool,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: int | None = None,
) -> tuple[bool, list[str]]:
    """Run ``command`` on another inventory host; return success and its output lines."""
    kwargs: dict[str, Any] = {"_sudo": sudo}
    if env:
        kwargs["_env"] = env
    if stdin is not None:
        kwargs["_stdin"] = stdin
    if timeout is not None:
        kwargs["_timeout"] = timeout
    ok, output = target.run_shell_command(command, **kwargs)
    return ok, output.output_lines


def evaluate_toplevel(builder: Host, attr: str, *, sudo: bool) -> str:
    """The toplevel's store path as the builder evaluates ``attr``; raises ``DeployFailed``."""
    key = (builder.name, attr)
    with _lock(key):
        if key not in _evaluated:
            command = StringCommand(*NIX, "eval", "--raw", QuoteString(f"{attr}.outPath"))
            ok, lines = run_on(builder, command, sudo=sudo, timeout=600)
            path = lines[-1].strip() if lines else ""
            if not ok or not path.startswith("/nix/store/"):
                cause = _nix_error(lines)
                raise DeployFailed(
                    f"{builder.name} cannot evaluate {attr}: {cause}; check that the flake "
                    "defines this nixosConfigurations entry (or set nixos_config)"
                )
            _evaluated[key] = path
    return _evaluated[key]


_flake_metadata: dict[tuple[str, str], dict[str, Any]] = {}


def flake_metadata(builder: Host, flake: str, *, sudo: bool) -> dict[str, Any]:
    """
    What the builder resolves ``flake`` to: its git ``revision`` (None for a path or a dirty
    tree), ``narHash`` and ``lastModified``; ``{"error": ...}`` when Nix cannot tell. Cached.
    """
    key = (builder.name, flake)
    with _lock(key):
        if key not in _flake_metadata:
            command = StringCommand(*NIX, "flake", "metadata", "--json", QuoteString(flake))
            ok, lines = run_on(builder, command, sudo=sudo, timeout=120)
            try:
                data = json.loads(lines[-1]) if ok and lines else None
            except json.JSONDecodeError:
                data = None
            if not isinstance(data, dict):
                _flake_metadata[key] = {"error": _nix_error(lines)}
            else:
                locked = data.get("locked") or {}
                _flake_metadata[key] = {
                    "revision": data.get("revision") or locked.get("rev"),
                    "narHash": locked.get("narHash"),
                    "lastModified": data.get("lastModified"),
                }
    return _flake_metadata[key]


def _nix_error(lines: Sequence[str]) -> str:
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    return (lines[-1].strip() if lines else "no output") or "no output"


def is_built(builder: Host, path: str, *, sudo: bool) -> bool:
    command = StringCommand(*NIX, "path-info", QuoteString(path))
    ok, _ = run_on(builder, command, sudo=sudo)
    return ok


def diff_closures(builder: Host, before: str, after: str, *, sudo: bool) -> list[str]:
    """What changes between two closures both present on the builder (empty when unknown)."""
    if not (is_built(builder, before, sudo=sudo) and is_built(builder, after, sudo=sudo)):
        return []
    command = StringCommand(*NIX, "store", "diff-closures", QuoteString(before), QuoteString(after))
    ok, lines = run_on(builder, command, sudo=sudo)
    return lines if ok else []


# -- command builders ------------------------------------------------------------------


def build_command(attr: str) -> StringCommand:
    return StringCommand(*NIX, "build", QuoteString(attr), "--no-link", "--json")


def sign_command(path: str, key_file: str = SIGNING_KEY_PATH) -> StringCommand:
    return StringCommand(
        *NIX, "store", "sign", "--key-file", QuoteString(key_file), "--recursive",
        QuoteString(path),
    )  # fmt: skip


def copy_command(path: str, user: str, address: str) -> StringCommand:
    # ssh-ng runs `nix-daemon --stdio` on the target as the deploy user: for a user the
    # target's daemon does not trust, paths are accepted only with a signature by a key in
    # its trusted-public-keys, hence the explicit signing before.
    return StringCommand(
        *NIX, "copy", "--to", QuoteString(f"ssh-ng://{user}@{address}"), QuoteString(path)
    )


def nix_sshopts(port: int) -> str:
    """NIX_SSHOPTS for the builder's ssh: the deploy key and strict host-key checking against
    the builder's known_hosts (both from deploys/secrets.py), the port (an ssh-ng URL has
    none), and keep-alives so a cut link fails the copy in seconds instead of hanging. Nix
    splits it on spaces."""
    return " ".join(
        (
            f"-p {port}",
            *SSH_OPTIONS,
            "-o ConnectTimeout=10",
            "-o ServerAliveInterval=2",
            "-o ServerAliveCountMax=3",
        )
    )


def switch_command(path: str, action: str) -> StringCommand:
    return StringCommand(QuoteString(f"{path}/bin/switch-to-configuration"), QuoteString(action))


def set_profile_command(path: str) -> StringCommand:
    return StringCommand("nix-env", "-p", SYSTEM_PROFILE, "--set", QuoteString(path))


# -- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Builder:
    """How a target's operations reach its builder."""

    host: Host
    sudo: bool


@operation()
def build_toplevel(plan: Plan, builder: Builder) -> Generator[PyinfraCommand, None, None]:
    """
    Build the plan's toplevel on its builder, once however many targets share it.

    + plan: the target's ``Plan``
    + builder: its ``Builder``

    **Example:**

    .. code:: python

        nixos.build_toplevel(plan=plan, builder=builder)
    """
    if plan.up_to_date:
        host.noop(plan.noop_reason)
        return
    if plan.built:
        host.noop(f"{plan.builder} has already built {plan.desired}")
        return
    yield FunctionCommand(_build, (plan, builder), {})


def _build(state: State, host: Host, plan: Plan, builder: Builder) -> bool:
    key = (builder.host.name, plan.desired)
    with _lock(key):
        if key in _built:
            return True
        ok, lines = run_on(builder.host, build_command(plan.attr), sudo=builder.sudo)
        built = _built_paths(lines)
        if not ok or plan.desired not in built:
            return _fail(
                host, f"building {plan.attr} on {plan.builder} failed: {_nix_error(lines)}"
            )
        _built.add(key)
    host.log_styled(f"built {plan.desired} on {plan.builder}", log_func=logger.info)
    return True


def _built_paths(lines: Sequence[str]) -> list[str]:
    for line in reversed(lines):
        if line.startswith("["):
            try:
                results = json.loads(line)
            except json.JSONDecodeError:
                continue
            return [out for r in results for out in r.get("outputs", {}).values()]
    return []


@operation()
def copy_closure(
    plan: Plan,
    builder: Builder,
    address: str,
    port: int,
    user: str,
) -> Generator[PyinfraCommand, None, None]:
    """
    Copy the plan's closure from the builder to the target over ssh-ng, signed.

    + plan, builder: as for ``build_toplevel``
    + address, port, user: how the builder reaches the target (its inventory SSH data); the
      builder verifies the target's host key against its known_hosts (never accept-new)

    **Example:**

    .. code:: python

        nixos.copy_closure(plan=plan, builder=builder, address="192.168.1.122",
                           port=8023, user="beau")
    """
    if plan.up_to_date or not plan.copies:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to copy")
        return
    yield FunctionCommand(_copy, (plan, builder, address, port, user), {})


def _copy(
    state: State, host: Host, plan: Plan, builder: Builder, address: str, port: int, user: str
) -> bool:
    steps = (
        (sign_command(plan.desired), None, f"signing {plan.desired} with {SIGNING_KEY_PATH}"),
        (
            copy_command(plan.desired, user, address),
            {"NIX_SSHOPTS": nix_sshopts(port)},
            f"copying to {user}@{address}:{port}",
        ),
    )
    for command, env, what in steps:
        ok, lines = run_on(builder.host, command, sudo=builder.sudo, env=env, timeout=3600)
        if not ok:
            cause = _nix_error(lines)
            if "lacks a valid signature" in cause:
                cause += (
                    f"; {plan.target}'s Nix does not trust {plan.builder}'s signing key: "
                    "run deploys/secrets.py"
                )
            elif "Host key verification failed" in " ".join(lines):
                cause = (
                    f"{plan.builder} cannot verify {plan.target}'s SSH host key: set its "
                    "ssh_host_key and run deploys/secrets.py"
                )
            return _fail(host, f"{what} on {plan.builder} failed: {cause}")
    host.log_styled(f"copied {plan.desired} from {plan.builder}", log_func=logger.info)
    return True


@operation()
def dry_activate(plan: Plan, sudo: bool) -> Generator[PyinfraCommand, None, None]:
    """
    Run ``switch-to-configuration dry-activate`` and show its report; changes nothing.

    + plan: the target's ``Plan``
    + sudo: run it with sudo (a non-root deploy user)
    """
    if plan.up_to_date or not plan.copies:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to activate")
        return
    yield FunctionCommand(_dry_activate, (plan, sudo), {})


def _dry_activate(state: State, host: Host, plan: Plan, sudo: bool) -> bool:
    ok, lines = run_on(host, switch_command(plan.desired, "dry-activate"), sudo=sudo)
    for line in lines:
        host.log_styled(f"dry-activate: {line}", log_func=logger.info)
    if not ok:
        return _fail(host, f"dry-activate of {plan.desired} failed: {_nix_error(lines)}")
    return True


@operation()
def activate(plan: Plan, sudo: bool) -> Generator[PyinfraCommand, None, None]:
    """
    Make the plan's system current (``switch``/``test``) and/or the boot default
    (``switch``/``boot``), then check that the target really runs or boots it.

    + plan: the target's ``Plan``
    + sudo: run with sudo (a non-root deploy user)
    """
    if plan.up_to_date or plan.action not in ACTIVATING:
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: no activation")
        return
    if plan.action in ("switch", "boot"):
        yield set_profile_command(plan.desired)
    yield switch_command(plan.desired, plan.action)
    yield FunctionCommand(_verify, (plan, sudo), {})


def _verify(state: State, host: Host, plan: Plan, sudo: bool) -> bool:
    link = SYSTEM_PROFILE if plan.action == "boot" else CURRENT_SYSTEM
    ok, lines = run_on(host, StorePathLink().command(link), sudo=sudo)
    now = lines[0].strip() if ok and lines else None
    if now != plan.desired:
        return _fail(host, f"after {plan.action}, {link} is {now or 'missing'}, not {plan.desired}")
    verb = "boots" if plan.action == "boot" else "runs"
    host.log_styled(f"{plan.target} now {verb} {plan.desired}", log_func=logger.info)
    return True


def _fail(host: Host, message: str) -> bool:
    host.log_styled(f"failed: {message}", fg="red", log_func=logger.error)
    summary_for(host.state).fail(host.name, message)
    return False
