"""A host with recorded facts, for calling operations' ``_inner`` without a connection."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pyinfra.api import Config
from pyinfra.api.command import FunctionCommand, PyinfraCommand, StringCommand
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.facts.server import User

from operations.builder.nix import NIX_CONF, NixConfig, NixConfText
from operations.core.models import NIXOS_MARKER, SYSTEMD_RUNNING
from operations.data.steady import HostKind


def _key(cls: type, kwargs: dict[str, Any]) -> tuple[type, str]:
    # pyinfra's global arguments (``_sudo=False``) say how a fact is read, not which one.
    return cls, repr(sorted((k, v) for k, v in kwargs.items() if not k.startswith("_")))


class FakeState:
    cwd = "/"
    current_stage = StateStage.Execute

    def __init__(self) -> None:
        self.config = Config()
        # What the run summary reads (operations/core/summary.py).
        self.failed_hosts: set[Any] = set()
        self.inventory: list[Any] = []
        self.callback_handlers: list[Any] = []

    def add_callback_handler(self, handler: Any) -> None:
        self.callback_handlers.append(handler)


class FakeHost:
    """Facts are looked up by class and arguments; a fact nobody recorded fails the test."""

    print_prefix = ""
    current_op_global_arguments = None

    def __init__(self, name: str = "nas", data: dict[str, Any] | None = None) -> None:
        self.name = name
        self.data = data or {}
        self.facts: dict[tuple[type, str], Any] = {}
        self.noops: list[str] = []
        self.logged: list[str] = []

    def fact(self, cls: type, value: Any, **kwargs: Any) -> FakeHost:
        self.facts[_key(cls, kwargs)] = value
        return self

    def get_fact(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.facts[_key(cls, kwargs)]
        except KeyError:
            if cls is HostKind:
                return self._kind()
            raise KeyError(f"no recorded fact {cls.__name__}({kwargs})") from None

    def _kind(self) -> frozenset[str]:
        """``HostKind`` from the recorded facts of the paths it reads."""
        nixos = _key(File, {"path": NIXOS_MARKER})
        systemd = _key(Directory, {"path": SYSTEMD_RUNNING})
        if nixos not in self.facts and systemd not in self.facts:
            raise KeyError("no recorded fact HostKind (nor /etc/NIXOS, /run/systemd/system)")
        kind = {"nixos"} if self.facts.get(nixos) is not None else set()
        return frozenset(kind | ({"systemd"} if self.facts.get(systemd) else set()))

    def noop(self, description: str) -> None:
        self.noops.append(description)

    def log_styled(self, message: str, **kwargs: Any) -> None:
        self.logged.append(message)

    def get_temp_filename(self, *args: Any, **kwargs: Any) -> str:
        return "_tempfile_"


def nix_host(
    name: str = "nas",
    nix_conf: str | None = "",
    config: Mapping[str, object] | None = None,
    *,
    nixos: bool = False,
    systemd: bool = False,
) -> FakeHost:
    """
    A host whose Nix the nix.conf operations read and write, facts recorded the way the
    operations ask for them: ``nix_conf`` is the file's text (None: missing), ``config`` what
    ``nix show-config`` answers; root runs them; ``/etc/NIXOS`` when ``nixos``, systemd when
    ``systemd``; an existing nix.conf whose content differs from what is written (what
    ``files.put`` reads: mode, its directory, a checksum).
    """
    host = FakeHost(name)
    host.fact(NixConfig, config)
    host.fact(File, {"mode": 644} if nixos else None, path=NIXOS_MARKER)
    host.fact(Directory, {"mode": 755} if systemd else None, path=SYSTEMD_RUNNING)
    host.fact(User, "root")
    host.fact(NixConfText, nix_conf, path=NIX_CONF)
    host.fact(File, {"mode": 644}, path=NIX_CONF)
    host.fact(Directory, {"mode": 755}, path="/etc/nix")
    host.fact(Sha1File, "0" * 40, path=NIX_CONF)
    return host


@contextmanager
def on_host(fake: FakeHost) -> Iterator[FakeHost]:
    with ctx_state.use(FakeState()), ctx_host.use(fake):
        yield fake


def run(fake: FakeHost, op: Any, *args: Any, **kwargs: Any) -> list[PyinfraCommand]:
    """All commands ``op`` yields on ``fake`` (its noops land in ``fake.noops``)."""
    with on_host(fake):
        return list(op._inner(*args, **kwargs))


def failure(fake: FakeHost, op: Any, *args: Any, **kwargs: Any) -> str:
    """Why ``op`` fails ``fake``: it yields one command, which fails the host with this."""
    (command,) = run(fake, op, *args, **kwargs)
    assert isinstance(command, FunctionCommand), command
    return str(command.args[0])


def shell(commands: list[Any]) -> list[str]:
    """Commands as text: shell commands as the host would run them, others by type."""
    out: list[str] = []
    for command in commands:
        if isinstance(command, str):  # pyinfra's own ops may yield text
            out.append(command)
        elif isinstance(command, StringCommand):
            out.append(command.get_raw_value())
        elif isinstance(command, FunctionCommand):
            out.append(f"{command.function.__name__}: {command.args[0]}")
        else:
            out.append(type(command).__name__ + ":" + str(getattr(command, "dest", "")))
    return out


def written(command: Any) -> str:
    """The content a ``files.replace_file`` command writes (it travels base64 on stdin)."""
    assert isinstance(command, StringCommand), command
    return base64.b64decode(command.connector_arguments["_stdin"]).decode()
