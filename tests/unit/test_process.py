"""The remote half of the process seam: session bound, retries, lost channels as causes."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import gevent
import pytest
from paramiko import ChannelException, SSHException
from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import StringCommand
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.context import ctx_host
from pyinfra.facts.files import File

from operations.core import process
from operations.core.failures import DeployFailed, Unable, attempt
from operations.core.models import SYSTEMD_RUNNING
from operations.data.steady import HostKind, read_with_host_kind, runs_nixos, runs_systemd
from operations.push.commands import SystemLinks
from tests.unit.fake_host import FakeHost, on_host


class Connector:
    """Answers commands after a short sleep; counts how many run at once."""

    def __init__(self, refusals: int = 0, error: Exception | None = None) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0
        self.refusals = refusals
        self.error = error

    def run_shell_command(self, command: Any, **kwargs: Any) -> tuple[bool, CommandOutput]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.refusals:
            self.refusals -= 1
            raise ChannelException(2, "Connect failed")
        self.running += 1
        self.most = max(self.most, self.running)
        gevent.sleep(0.01)
        self.running -= 1
        return True, CommandOutput([OutputLine("stdout", "ok")])

    put_file = get_file = run_shell_command


class Host:
    def __init__(self, connector: Connector) -> None:
        self.name = "nas"
        self.connector = connector

    def run_shell_command(self, command: Any, **kwargs: Any) -> tuple[bool, CommandOutput]:
        return self.connector.run_shell_command(command, **kwargs)


def test_at_most_limit_sessions_run_at_once_on_one_host():
    host = Host(Connector())
    process.limit_sessions(host, 2)  # type: ignore[arg-type]
    process.limit_sessions(host, 9)  # type: ignore[arg-type]  # the first bound stays

    greenlets = [gevent.spawn(host.run_shell_command, "true") for _ in range(10)]
    gevent.joinall(greenlets)

    assert host.connector.most == 2
    assert all(g.value[0] for g in greenlets)


def test_a_refused_channel_is_retried_then_succeeds(monkeypatch):
    monkeypatch.setattr(process, "CHANNEL_RETRY_DELAYS", (0, 0, 0))
    host = Host(Connector(refusals=2))
    process.limit_sessions(host, 1)  # type: ignore[arg-type]

    assert process.run_on(host, StringCommand("true"), sudo=False, doing="x") == (True, ["ok"])  # type: ignore[arg-type]
    assert host.connector.calls == 3


def test_refusals_past_the_retries_name_the_host_and_what_was_being_done(monkeypatch):
    monkeypatch.setattr(process, "CHANNEL_RETRY_DELAYS", (0, 0))
    host = Host(Connector(refusals=99))
    process.limit_sessions(host, 1)  # type: ignore[arg-type]

    with pytest.raises(DeployFailed) as failure:
        process.read_on(host, File, path="/root/.nixpush/deploy_ed25519", sudo=True,  # type: ignore[arg-type]
                        doing="checking /root/.nixpush/deploy_ed25519")  # fmt: skip

    assert str(failure.value).startswith("lost the SSH channel to nas (sshd refused a session: ")
    assert str(failure.value).endswith("while checking /root/.nixpush/deploy_ed25519")
    assert host.connector.calls == 3


def test_a_lost_connection_is_not_retried_and_never_reads_as_missing():
    host = Host(Connector(error=SSHException("SSH session not active")))
    process.limit_sessions(host, 1)  # type: ignore[arg-type]

    with pytest.raises(DeployFailed, match=r"lost the SSH connection to nas \(SSH session not "
                       r"active\) while checking /x"):  # fmt: skip
        process.read_on(host, File, path="/x", sudo=False, doing="checking /x")  # type: ignore[arg-type]
    assert host.connector.calls == 1


def test_read_on_quotes_the_fact_arguments():
    seen: list[str] = []

    class Recording(Connector):
        def run_shell_command(self, command: Any, **kwargs: Any) -> tuple[bool, CommandOutput]:
            seen.append(command.get_raw_value())
            return True, CommandOutput([])

    host = Host(Recording())
    assert process.read_on(host, File, path="/x; whoami", sudo=False, doing="d") is None  # type: ignore[arg-type]
    assert "'/x; whoami'" in seen[0]


def test_a_step_that_raises_fails_only_its_host_in_one_line():
    from operations.core.failures import host_step
    from operations.core.runstate import summary_for
    from tests.unit.fake_host import FakeState

    logged: list[str] = []
    state = FakeState()

    class Target:
        name = "pi5"

        def log_styled(self, message: str, **kwargs: Any) -> None:
            logged.append(message)

    @host_step
    def _copy(state: Any, host: Any) -> bool:
        raise KeyError("injected")

    @host_step
    def _sign(state: Any, host: Any) -> bool:
        raise DeployFailed("lost the SSH channel to nas while signing")

    target = Target()
    target.state = state  # type: ignore[attr-defined]
    assert _copy(state, target) is False
    assert logged == ["failed: copy failed: KeyError: 'injected'"]
    assert _sign(state, target) is False
    assert summary_for(state).causes["pi5"] == "copy failed: KeyError: 'injected'"


def test_attempt_answers_the_plan_or_why_planning_failed():
    assert attempt("planning pi4", lambda: 42) == 42
    assert attempt("planning pi4", fails_with(DeployFailed("builder nas is unreachable"))) == (
        Unable("builder nas is unreachable")
    )
    assert attempt("planning pi4", fails_with(KeyError("injected"))) == (
        Unable("planning pi4 failed: KeyError: 'injected'")
    )


def fails_with(error: Exception) -> Any:
    def compute() -> None:
        raise error

    return compute


def test_what_a_host_is_is_read_once_per_host_per_run_in_one_command():
    class Counting(FakeHost):
        reads = 0

        def get_fact(self, cls: type, *args: Any, **kwargs: Any) -> Any:
            type(self).reads += 1
            assert kwargs.get("_sudo") is False  # world-readable: no sudo
            return super().get_fact(cls, *args, **kwargs)

    nixos = Counting("pi4").fact(HostKind, frozenset({"nixos"}))
    with on_host(nixos):
        assert runs_nixos() and runs_nixos() and not runs_systemd() and not runs_systemd()
    assert Counting.reads == 1
    other = Counting("pi5").fact(HostKind, frozenset({"systemd"}))
    with on_host(other):
        assert not runs_nixos() and runs_systemd()  # another host (or the next run's) asks
    assert Counting.reads == 2


def test_host_kind_reads_both_markers():
    fact = HostKind()
    assert fact.process(["nixos", "systemd"]) == {"nixos", "systemd"}
    assert fact.process(["systemd", "junk"]) == {"systemd"}
    # Run for real on this machine: no /etc/NIXOS; systemd as it is here.
    out = subprocess.run(
        ["sh", "-c", fact.command().get_raw_value()], capture_output=True, text=True, check=True
    )
    here = {"systemd"} if os.path.isdir(SYSTEMD_RUNNING) else set()
    assert fact.process(out.stdout.splitlines()) == here


def test_a_read_that_brings_the_host_kind_along_spares_the_kinds_own_command():
    inventory = Inventory((["@local"], {}))
    State(inventory, Config())
    local = inventory.get_host("@local")
    # Run for real on this machine: neither system link, no /etc/NIXOS, systemd as it is.
    assert read_with_host_kind(local, SystemLinks, doing="reading the links") == (None, None)

    def no_more_commands(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the kind was read again")

    local.get_fact = no_more_commands  # type: ignore[method-assign]
    with ctx_host.use(local):
        assert not runs_nixos()
        assert runs_systemd() == os.path.isdir(SYSTEMD_RUNNING)
