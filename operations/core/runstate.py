"""
What one pyinfra run keeps on the controller, in one object per run: the run's summary, the
values decrypted from sops, the public halves derived from them, what each host is, and the
push deploy's shared state. Nothing of a run lives at module level, so two runs in one
process (tests, a long-lived controller) share nothing.

A run is pyinfra's ``State``, the one key: ``run_of(state)`` where deploy code has the state,
``current_run()`` (the state pyinfra runs now) everywhere else. Decrypted values are dropped
when the run ends: pyinfra disconnects every host it connected to last, also after ``--dry``
or a failure.

.. code:: python

    run = run_of(state)
    run.summary.fail("pi4", "build failed")
    current_run().decrypted  # (file, key path) -> Plaintext, this run's only
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from pyinfra.api.state import BaseStateCallback, State
from pyinfra.context import ContextObject, ctx_state
from typing_extensions import override

from operations.core.summary import RunSummary

if TYPE_CHECKING:
    from pyinfra.api.host import Host

    from operations.core.models import KeyPath, Plaintext


@dataclass(eq=False)
class Run:
    """
    One run's state on the controller (see the module's doc).

    + state: pyinfra's ``State`` of the run
    + decrypted: sops values by (absolute file, key path), kept until the run ends
    + decrypting: held while one greenlet runs sops, so two hosts asking for one value at once
      run it once
    + ssh_public_keys: public halves derived this run, by the SHA-256 of their private key
      (every target of a builder asks for the same one: an ssh-keygen process each, otherwise)
    + host_kinds: per host name, what it is (``operations.data.steady``)
    + push_key_files_checked: ``check_push_key_file``'s passes this run, by the digest of all
      it read (the builder, the file, the allowed and the controller's keys, the host keys)
    + deploy: the push deploy's ``Deploy`` (``operations.push.start``), once started
    """

    state: State
    decrypted: dict[tuple[str, KeyPath], Plaintext] = field(default_factory=dict)
    decrypting: threading.Lock = field(default_factory=threading.Lock)
    ssh_public_keys: dict[str, str] = field(default_factory=dict)
    host_kinds: dict[str, frozenset[str]] = field(default_factory=dict)
    push_key_files_checked: set[str] = field(default_factory=set)
    deploy: object | None = None
    _summary: RunSummary | None = None

    @property
    def summary(self) -> RunSummary:
        """The run's summary, made (and set to print at exit) on first use: it notes the hosts
        that could not connect by then."""
        if self._summary is None:
            failed = self.state.failed_hosts
            summary = RunSummary(
                self.state, unreachable={h.name for h in failed if not h.connected}
            )
            atexit.register(summary.print)
            atexit.register(summary.write_report)
            self._summary = summary
        return self._summary

    def drop_secrets(self) -> None:
        """Forget every decrypted value (the run ended)."""
        with self.decrypting:
            self.decrypted.clear()


class _RunEnd(BaseStateCallback):
    """Drops the run's decrypted values when pyinfra disconnects a host: it does so at the end
    of a run (``--dry`` and failures too). A host disconnected earlier (a reboot) costs only a
    new decryption: deploy code has planned every secret by then."""

    def __init__(self, run: Run) -> None:
        self.run = run

    @override
    def host_disconnect(self, state: State, host: Host) -> None:  # type: ignore[override]
        self.run.drop_secrets()


# The one registry of runs, by their State: an entry goes with its State. (Deploy code runs
# in greenlets, which switch only on I/O: nothing here needs a lock.)
_runs: WeakKeyDictionary[State, Run] = WeakKeyDictionary()


def run_of(state: State) -> Run:
    """The run of ``state`` (pyinfra's context proxy or the State itself), made on first use."""
    real = state
    if isinstance(real, ContextObject):  # deploy code sees the proxy; key by the State itself
        real = ctx_state.get()  # type: ignore[no-untyped-call]  # pyinfra leaves it untyped
    run = _runs.get(real)
    if run is None:
        run = _runs[real] = Run(real)
        if hasattr(real, "callback_handlers"):  # a State never initialised never runs
            real.add_callback_handler(_RunEnd(run))  # type: ignore[no-untyped-call]  # untyped
    return run


def summary_for(state: State) -> RunSummary:
    """The run's summary (``Run.summary``), created (and set to print at exit) on first use."""
    return run_of(state).summary


def current_run() -> Run:
    """The run pyinfra runs now (its current State): where code without the state keeps what
    it learns. ``RuntimeError`` outside a pyinfra run."""
    state = ctx_state.get()  # type: ignore[no-untyped-call]  # pyinfra leaves it untyped
    if state is None:
        raise RuntimeError("no pyinfra run: nixpush keeps run state on pyinfra's current State")
    return run_of(state)
