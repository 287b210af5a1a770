"""
Activation waves (``deploy_wave`` data): wave 0 activates first; a later wave's hosts launch
their activation only once every host of each earlier wave has an outcome and all of them
passed (deployed and, after their ``wave_soak``, healthy again). A failure, a rollback or a
hold stops the rest: their hosts are ``held: wave 0 failed (pi4 rolled back)``.

Only activation waits: builds and copies run ahead for every wave. The gate is one run's
state (``RunCache.waves``):

- ``start_deploy`` ``expect``s every target in ``--limit`` whose action activates, with its
  wave, from the parsed inventory, before any host is planned: a host pyinfra could not
  connect to runs no deploy code, and it must still count. One that could not connect is
  reported failed at once (``pi4 could not connect``); an ``offline_ok`` host that is away is
  ``excuse``d: it holds nothing up;
- deploy code (prepare time) ``join``s each host whose activation is planned, with the
  longest it may take, and ``excuse``s one that needs none (unchanged, build only);
- each activation ``wait_turn``s (at once for the lowest wave) and ``report``s its result,
  always (``None``: passed; else what stopped it, e.g. ``pi4 rolled back``);
- an expected host that never joined (its planning failed) or that pyinfra dropped before its
  activation (its build or copy failed) never reports: ``wait_turn`` counts it failed
  (``pi4 failed before its activation``), the first from the gate itself (every host was
  planned before anything executes), the second from pyinfra's failed hosts, read while it
  waits.

pyinfra runs an operation on all hosts at once (one greenlet each), so a later wave's hosts
wait beside the earlier wave's activations. ``--serial``, ``--no-wait`` or a ``--parallel``
below the number of activating hosts would have a later wave wait for hosts that cannot run
yet: a wait is bounded (the earlier hosts' worst case), then the host is held.

.. code:: python

    waves.expect("pi4", 0); waves.expect("pi5", 1)    # start_deploy, from the inventory
    waves.join("pi4", 0, worst=600); waves.join("pi5", 1, worst=600)  # deploy code
    held = waves.wait_turn("pi5", 1, dropped)   # None: go; else why it is held
    waves.report("pi4", None)                              # deployed and healthy after the soak
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gevent.event import Event

# How often a waiting host looks for hosts pyinfra dropped (they never report).
POLL = 1.0


@dataclass(eq=False)
class Waves:
    """One run's activation waves (see the module's doc)."""

    # Wave -> the hosts expected to activate in it (``expect``, ``join``), less those excused.
    members: dict[int, set[str]] = field(default_factory=dict)
    # Host -> the longest its activation may keep a later wave waiting (``activate.worst_case``):
    # the hosts whose activation is planned (``join``).
    worst: dict[str, float] = field(default_factory=dict)
    # Host -> None (passed) or what stopped it, once known.
    results: dict[str, str | None] = field(default_factory=dict)
    _done: dict[int, Event] = field(default_factory=dict)

    def expect(self, host: str, wave: int) -> None:
        """``host`` is a target of this run that activates in ``wave`` (``start_deploy``,
        before any host is planned): until it joins or is excused, it counts."""
        self.members.setdefault(wave, set()).add(host)
        self._done.setdefault(wave, Event())

    def join(self, host: str, wave: int, worst: float) -> None:
        """``host`` activates in ``wave`` this run (deploy code, prepare time), at worst in
        ``worst`` seconds."""
        self.expect(host, wave)
        self.worst[host] = worst

    def excuse(self, host: str) -> None:
        """``host`` does not activate this run after all (nothing to activate; ``offline_ok``
        and away): it holds no wave up."""
        for wave, names in list(self.members.items()):
            if host in names:
                names.discard(host)
                if not names:
                    del self.members[wave]
                    self._done.pop(wave, None)

    def wave_of(self, host: str) -> int | None:
        return next((w for w, names in self.members.items() if host in names), None)

    @property
    def many(self) -> bool:
        """More than one wave counts this run (only then does anything wait or soak)."""
        return len(self.members) > 1

    def has_later(self, wave: int) -> bool:
        """Whether hosts of a later wave will wait for this one (a host of the last wave, or of
        the only one, need not soak; nor one whose later waves all failed before activating)."""
        return any(w > wave and names & set(self.worst) for w, names in self.members.items())

    def report(self, host: str, trouble: str | None) -> None:
        """``host``'s result: None when it passed, else what stopped it; the first one holds."""
        self.results.setdefault(host, trouble)
        wave = self.wave_of(host)
        if wave is not None and self.members[wave] <= set(self.results):
            self._done[wave].set()

    def troubles(self, wave: int) -> list[str]:
        return [
            trouble
            for name in sorted(self.members.get(wave, ()))
            if (trouble := self.results.get(name)) is not None
        ]

    def wait_turn(
        self,
        host: str,
        wave: int,
        dropped: Callable[[], Iterable[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> str | None:
        """
        Wait until every earlier wave has its outcome: None when they all passed (launch now),
        else why ``host`` is held (``wave 0 failed (pi4 rolled back)``).

        + dropped: the names pyinfra has failed so far (a member among them that has not
          reported failed before its activation)

        It waits at most the earlier waves' worst case (each wave's slowest host's
        ``worst``), then holds ``host``: their hosts could not run beside it. It runs at
        execute time, when every host was planned: an expected host of an earlier wave that
        never joined failed before its activation (it could not connect or be planned).
        """
        earlier_waves = sorted(w for w in self.members if w < wave)
        for earlier in earlier_waves:
            for name in sorted(self.members[earlier] - set(self.worst)):
                self.report(name, f"{name} failed before its activation")
        bound = sum(
            max((self.worst.get(name, 0.0) for name in self.members[w]), default=0.0)
            for w in earlier_waves
        )
        deadline = clock() + bound
        for earlier in earlier_waves:
            event = self._done[earlier]
            while not event.is_set():
                for name in dropped():
                    if name in self.members[earlier] and name not in self.results:
                        self.report(name, f"{name} failed before its activation")
                if event.is_set():
                    break
                if clock() >= deadline:
                    waiting = sorted(self.members[earlier] - set(self.results))
                    return (
                        f"wave {earlier} did not finish within {bound:.0f}s (still waiting "
                        f"for {', '.join(waiting)}: waves need pyinfra to run a step on all "
                        "hosts at once, not --serial, --no-wait or a --parallel below the "
                        "number of hosts)"
                    )
                event.wait(POLL)
            troubles = self.troubles(earlier)
            if troubles:
                return f"wave {earlier} failed ({', '.join(troubles)})"
        return None


def describe_wave(waves: Iterable[int], wave: int, soak: int) -> str | None:
    """The ``--dry`` line of a target in ``wave`` among the run's ``waves``: None when the
    run has one wave only."""
    present = sorted(set(waves))
    if len(present) < 2:
        return None
    order = ", ".join(str(w) for w in present)
    earlier = [w for w in present if w < wave]
    if not earlier:
        when = "activates first"
    else:
        when = f"activates once wave {earlier[-1]} is deployed and healthy"
    later = any(w > wave for w in present)
    after = (
        f"; then soaks {soak}s and checks its health again before the next wave" if later else ""
    )
    return f"deploy wave {wave} (of {order}): {when}{after}"
