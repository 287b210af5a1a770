"""
Step 3, sign and copy: the builder signs the closure with its Nix signing key, then copies it
to the target over ``ssh-ng`` as root, with its deploy key, verifying the target's host key.
At most ``max_parallel_copies`` copies leave one builder at once (its uplink is shared; the
others queue); a long copy shows its progress (paths and bytes), ``copy_timeout`` stops it.

Before a copy, ``push.space`` checks that it fits on the target (and, for switch and boot,
that the new kernel and initrd fit in its boot directory): a target without the room fails
before anything on it changes. Then, for a system to be activated, the target gets a GC root
for it (``switch.pin_copy_command``) that lasts until the activation's program pins the system
itself: a garbage collection in between (while a later wave waits) cannot delete it.

With ``substitute_on_target`` the copy runs with ``--substitute-on-destination``: the target's
daemon first fetches the missing paths its own substituters have (a cache near it, or
cache.nixos.org), and the builder sends only the rest, signed as always. A substituter that is
down or lacks a path costs nothing but its query: the builder sends that path.

Why sign: ``nix copy`` to a user the target's Nix does not trust is accepted only with a
signature by a key in the target's ``trusted-public-keys`` (``deploys/pi.py`` makes the target
trust the builder's key before it copies).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gevent.lock import BoundedSemaphore
from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.builder.nix_commands import nix_error
from operations.core.failures import fail, host_step
from operations.core.models import Builder, Plan
from operations.core.process import run_on
from operations.data.steady import known_nixos
from operations.push import space
from operations.push.commands import (
    copy_command,
    copy_progress,
    logged,
    nix_sshopts,
    plain_output,
    sign_command,
)
from operations.push.progress import run_watched, shower
from operations.push.runcache import RunCache
from operations.push.switch import pin_copy_command
from operations.trust.keys import SIGNING_KEY_PATH

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


def copy_slots(builder: Builder, cache: RunCache) -> BoundedSemaphore:
    """The builder's copy slots: ``max_parallel_copies``, but leaving one of its SSH sessions
    (``max_ssh_sessions``) free, since every running copy holds one and its progress needs
    another."""
    name = builder.host.name
    if name not in cache.copy_slots:
        sessions = builder.max_ssh_sessions
        slots = BoundedSemaphore(max(1, min(builder.max_parallel_copies, sessions - 1)))
        cache.copy_slots[name] = slots
    return cache.copy_slots[name]


@operation()
def sign_closure(
    plan: Plan, builder: Builder, cache: RunCache
) -> Generator[PyinfraCommand, None, None]:
    """
    Sign the plan's closure on the builder with its Nix signing key.

    + plan, builder, cache: as for ``build.build_toplevel``

    **Example:**

    .. code:: python

        copy.sign_closure(plan=plan, builder=builder, cache=deploy.cache)
    """
    if plan.up_to_date or not plan.action.copies:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to copy")
        return
    yield FunctionCommand(_sign, (plan, builder, cache), {})


@host_step
def _sign(state: State, host: Host, plan: Plan, builder: Builder, cache: RunCache) -> bool:
    doing = f"signing {plan.desired} with {SIGNING_KEY_PATH}"

    def sign() -> str | None:
        ok, lines = run_on(
            builder.host, sign_command(plan.desired), sudo=builder.sudo, timeout=3600, doing=doing
        )
        return None if ok else nix_error(lines)

    # Targets sharing a system share its signing: the first signs, the others wait for it.
    error = cache.signed((plan.builder, plan.desired), sign)
    if error is not None:
        return fail(host, f"{doing} on {plan.builder} failed: {error}")
    return True


@operation()
def copy_closure(
    plan: Plan,
    builder: Builder,
    cache: RunCache,
    address: str,
    port: int,
    user: str,
    substitute: bool = False,
) -> Generator[PyinfraCommand, None, None]:
    """
    Copy the plan's signed closure from the builder to the target over ssh-ng.

    + plan, builder, cache: as for ``build.build_toplevel``
    + address, port, user: how the builder reaches the target (its inventory SSH data); the
      builder verifies the target's host key against its known_hosts (never accept-new)
    + substitute: the target fetches first what its own substituters have
      (``substitute_on_target``); the builder sends the rest

    **Example:**

    .. code:: python

        copy.copy_closure(plan=plan, builder=builder, cache=deploy.cache,
                          address="192.168.1.122", port=8023, user="beau")
    """
    if plan.up_to_date or not plan.action.copies:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to copy")
        return
    to = Destination(address, port, user, substitute)
    yield FunctionCommand(_copy, (plan, builder, cache, to), {})


@dataclass(frozen=True)
class Destination:
    """Where a copy goes: the target as its builder reaches it, and whether it substitutes."""

    address: str
    port: int
    user: str
    substitute: bool = False


@host_step
def _copy(
    state: State, host: Host, plan: Plan, builder: Builder, cache: RunCache, to: Destination
) -> bool:
    address, port, user = to.address, to.port, to.user
    doing = f"copying to {user}@{address}:{port}"
    closure = _closure(plan, builder, cache)
    if isinstance(closure, str):
        return fail(host, closure)
    problem = _room_problem(host, plan, closure, cache) or _pin_copy(host, plan, cache)
    if problem is not None:
        return fail(host, problem)
    slots = copy_slots(builder, cache)
    if slots.locked():
        host.log_styled(
            f"waiting for a copy slot on {plan.builder} (max_parallel_copies "
            f"{builder.max_parallel_copies})",
            log_func=logger.info,
        )
    with slots:

        def describe(lines: Sequence[str]) -> str | None:
            return copy_progress(lines, closure.sizes)

        ok, lines = run_watched(
            builder.host,
            lambda log: logged(
                copy_command(plan.desired, user, address, to.substitute),
                log,
                builder.copy_timeout,
            ),
            describe=describe,
            show=shower(host, f"copying from {plan.builder}"),
            sudo=builder.sudo,
            env={"NIX_SSHOPTS": nix_sshopts(port)},
            doing=f"{doing} for {plan.target}",
            timeout=builder.copy_timeout,
            timeout_key="copy_timeout",
        )
        lines = plain_output(lines)
    if not ok:
        cause = nix_error(lines)
        if "lacks a valid signature" in cause:
            # A NixOS target trusts the key through its fragment, never through secrets.py.
            fix = (
                f"import {plan.target}'s NixOS fragment (`pyinfra @local "
                "deploys/nixos_config.py` writes it) and rebuild it with your own nixos-rebuild"
                if known_nixos(host)
                else "run deploys/secrets.py"
            )
            cause += f"; {plan.target}'s Nix does not trust {plan.builder}'s signing key: {fix}"
        elif "Host key verification failed" in " ".join(lines):
            cause = (
                f"{plan.builder} cannot verify {plan.target}'s SSH host key: set its "
                "ssh_host_key and run deploys/secrets.py"
            )
        return fail(host, f"{doing} on {plan.builder} failed: {cause}")
    host.log_styled(f"copied {plan.desired} from {plan.builder}", log_func=logger.info)
    return True


def _closure(plan: Plan, builder: Builder, cache: RunCache) -> space.Closure | str:
    """The closure's sizes and boot files, read on the builder once per system; else why not."""

    def read() -> space.Closure | str:
        doing = f"reading the size of {plan.desired}"
        ok, lines = run_on(
            builder.host, space.closure_command(plan.desired), sudo=builder.sudo, doing=doing
        )
        closure = space.parse_closure(lines) if ok else None
        if closure is None:
            return f"{doing} on {plan.builder} failed: {nix_error(lines)}"
        return closure

    return cache.closures((plan.builder, plan.desired), read)


def _pin_copy(host: Host, plan: Plan, cache: RunCache) -> str | None:
    """Before the copy of a system to be activated: its GC root on the target, held until the
    activation's program pins it (``switch.COPIED_ROOTS``), so that a garbage collection in
    between (the wave wait) cannot delete it. Why it could not be made, else None."""
    if not plan.action.activates:
        return None  # no program would take the root over
    ok, lines = run_on(
        host,
        pin_copy_command(plan.desired),
        sudo=cache.specs[plan.target].sudo,
        doing=f"making a GC root for {plan.desired}",
    )
    if ok:
        return None
    detail = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return f"making a GC root for {plan.desired} on {plan.target} failed: {detail}"


def _room_problem(host: Host, plan: Plan, closure: space.Closure, cache: RunCache) -> str | None:
    """Why the copy (and for switch or boot, the new kernel and initrd) does not fit on the
    target: one round trip to it. None: it fits."""
    spec = cache.specs[plan.target]
    boot_dir = spec.boot_dir if plan.action.sets_profile else None
    doing = f"reading the free space of {plan.target}"
    ok, lines = run_on(
        host,
        space.target_space_command(closure, boot_dir),
        sudo=False,  # df, test and Nix's validity query need no root
        stdin="\n".join(closure.sizes),
        doing=doing,
    )
    room = space.parse_target_space(lines, closure, boot_dir) if ok else None
    if room is None:
        return f"{doing} failed: {nix_error(lines)}"
    source = " (its substituters first)" if spec.substitute_on_target else ""
    host.log_styled(
        f"{room.missing_paths} of {len(closure.sizes)} paths to copy{source}; "
        f"{room.store.mount} has {space.human(room.store.free)} free",
        log_func=logger.info,
    )
    return space.shortfall(plan.target, room, spec.min_free_space, boot_dir)
