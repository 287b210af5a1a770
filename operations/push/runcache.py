"""
What one push run learns once and shares among its targets: the checked fleet, every answer
a builder gave (its Nix's systems, its push keys, a flake's metadata, whether a path is built),
the evaluations under way, the plans made, each build's outcome, the signatures, the copy slots,
the activation waves' gate.

One ``RunCache`` per pyinfra run, on ``operations.push.start.Deploy`` (``deploy.cache``), passed to
every push step. Deploy code runs once per host and operation bodies run again at execute
time, in greenlets; a run chaining deploy files (``deploys/secrets.py deploys/pi.py``) keeps
one ``Deploy``, so it keeps this cache too. Nothing here outlives its run.

.. code:: python

    cache = RunCache(specs)
    cache.built(("nas", path), lambda: look_up(path))   # the first target asks, others wait
    cache.plans_for("nas")                               # every plan made for nas's targets
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from gevent.lock import BoundedSemaphore, Semaphore

from operations.core.models import Plan
from operations.push.waves import Waves

if TYPE_CHECKING:
    import gevent

    from operations.data.fleet import HostSpec
    from operations.push.commands import Evaluated
    from operations.push.space import Closure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Locks(Generic[K]):
    """A lock per key, made when first asked for: ``with locks(key): ...``."""

    def __init__(self) -> None:
        self._locks: dict[K, Semaphore] = {}

    def __call__(self, key: K) -> Semaphore:
        return self._locks.setdefault(key, Semaphore())


class Once(Generic[K, V]):
    """Answers computed once per key: the first caller computes, the others wait for it and
    take its answer (``once(key, compute)``)."""

    def __init__(self) -> None:
        self._answers: dict[K, V] = {}
        self._locks: Locks[K] = Locks()

    def __call__(self, key: K, compute: Callable[[], V]) -> V:
        with self._locks(key):
            if key not in self._answers:
                self._answers[key] = compute()
        return self._answers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._answers


@dataclass(eq=False)
class RunCache:
    """
    One push run's shared state (see the module's doc).

    + specs: the checked fleet (``start_deploy``): a step reads a host's spec here, never its
      data again
    """

    specs: Mapping[str, HostSpec]
    # Per builder: the lock one target holds while it connects it, and those that could not be.
    connecting: Locks[str] = field(default_factory=Locks)
    unreachable_builders: set[str] = field(default_factory=set)
    # Per builder: its Nix's systems; which push key is missing (None: none is).
    platforms: Once[str, frozenset[str | None]] = field(default_factory=Once)
    push_keys_missing: Once[str, str | None] = field(default_factory=Once)
    # Per builder and flake: what the builder resolves it to; the greenlet evaluating every
    # selected target's toplevel.
    flakes: Once[tuple[str, str], dict[str, Any]] = field(default_factory=Once)
    evaluations: dict[tuple[str, str], gevent.Greenlet[..., dict[str, Evaluated | str]]] = field(
        default_factory=dict
    )
    # Per builder, the plans made this run (target -> Plan): what its one build covers.
    plans: dict[str, dict[str, Plan]] = field(default_factory=dict)
    # Per builder and store path (or pair of paths): in its store? what changes between them?
    built: Once[tuple[str, str], bool] = field(default_factory=Once)
    diffs: Once[tuple[str, str, str], list[str]] = field(default_factory=Once)
    # Per builder and desired path, the outcome of its build (None: built; else why not), and
    # per builder the lock of the one build that makes them.
    build_outcomes: dict[tuple[str, str], str | None] = field(default_factory=dict)
    building: Locks[str] = field(default_factory=Locks)
    # Per builder and store path: signed this run (None) or why not.
    signed: Once[tuple[str, str], str | None] = field(default_factory=Once)
    # Per builder and desired path: its closure's sizes and boot files (or why unread).
    closures: Once[tuple[str, str], Closure | str] = field(default_factory=Once)
    # Per builder: how many copies may run at once.
    copy_slots: dict[str, BoundedSemaphore] = field(default_factory=dict)
    # The activation waves (deploy_wave): who activates in which, and who passed.
    waves: Waves = field(default_factory=Waves)

    def planned(self, plan: Plan) -> None:
        """Remember ``plan`` among its builder's (deploy code, prepare time)."""
        self.plans.setdefault(plan.builder, {})[plan.target] = plan

    def plans_for(self, builder: str) -> list[Plan]:
        """Every plan made this run for targets of ``builder`` (deploy code runs for all of
        them before any operation executes)."""
        return list(self.plans.get(builder, {}).values())
