"""How tests (and the benchmark) drive the bench: the pyinfra CLI, ssh and testinfra."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.bench import fleet
from tests.bench import sops as bench_sops

REPO = fleet.REPO
BENCH_INVENTORY = "tests/bench/inventory.py"


def pyinfra_argv(*args: str) -> list[str]:
    """The pyinfra CLI of this virtualenv with ``args``."""
    return [str(Path(sys.executable).with_name("pyinfra")), *args]


def pyinfra(
    *args: str,
    check: bool = False,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the pyinfra CLI from the repo root exactly as a user would.

    ``env`` replaces the environment (default: this process's), e.g. ``bench_sops.env()``.
    """
    return subprocess.run(
        pyinfra_argv(*args),
        cwd=REPO,
        text=True,
        capture_output=True,
        check=check,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=None if env is None else dict(env),
    )


def ssh(host_name: str, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a shell command on a bench host over ssh, with the bench's strict host keys."""
    return subprocess.run(
        ["ssh", "-F", str(fleet.BENCH_DIR / "ssh_config"), host_name, command],
        text=True,
        capture_output=True,
        check=check,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


# Seconds an idle shared connection of testinfra's stays open.
CONTROL_PERSIST = 30


def on_host(host_name: str) -> Any:
    """testinfra's host, its checks over one shared SSH connection (``BenchHost.ssh_control``):
    a full handshake per check cost 0.25 s, and tests make hundreds. Stopping a host removes
    its socket; a cut link ends the connection in seconds (``ServerAliveInterval``)."""
    import testinfra  # imported late: only the end-to-end layer needs it

    h = fleet.host(host_name)
    return testinfra.get_host(
        f"ssh://{h.name}?sudo={'false' if h.user == 'root' else 'true'}",
        ssh_config=str(fleet.BENCH_DIR / "ssh_config"),
        controlpath=str(h.ssh_control).replace("%", "%%"),  # testinfra %-formats the command
        controlpersist=CONTROL_PERSIST,
    )


class PushPreparation:
    """``prepare_push`` once for the fleet as it runs, and again only when that changed: other
    hosts (``up --pis``), or a host started again (its init writes its ``authorized_keys`` anew
    and its ``/run`` is empty). What tests change otherwise, they put back themselves."""

    def __init__(self) -> None:
        self._prepared_for: tuple[tuple[str, int | None], ...] | None = None

    def ensure(self) -> None:
        running = tuple((h.name, fleet.init_pid(h)) for h in fleet.HOSTS)
        if running != self._prepared_for:
            prepare_push()
            self._prepared_for = running


def prepare_push() -> None:
    """Prepare the bench NAS as builder and install the push keys, as a user first would."""
    bench_sops.ensure()
    for deploy in ("deploys/nas.py", "deploys/secrets.py"):
        if (REPO / deploy).exists():
            # The age key in the environment, as a user's shell has it (deploys/secrets.py).
            result = pyinfra("-y", BENCH_INVENTORY, deploy, env=bench_sops.env())
            assert result.returncode == 0, result.stdout + result.stderr
