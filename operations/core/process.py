"""The one place nixpush runs processes: on the controller (where pyinfra runs), and on an
inventory host from another host's operation.

Local commands are argument lists, never shell strings, so no value is ever parsed by a shell.
Anything secret goes in ``input`` (the process's stdin): argv and the environment of a process
are visible to every user of the machine (``/proc/PID/cmdline``, ``ps e``).
Tests patch ``run_local`` to assert exact argument lists.

Remote commands go through pyinfra's connection to the host. sshd accepts only so many
sessions (channels) at once on one connection (``MaxSessions``, 10 by default, on NixOS too),
and every target planning in parallel opens channels on its builder's connection: so
``limit_sessions`` bounds them per host, for facts and commands alike, and retries a refused
channel open with backoff. ``run_on`` and ``read_on`` turn a lost channel into
``DeployFailed`` naming the host and what was being done: a read that failed is never taken for
a missing thing. ``fresh_login_run`` runs a command over a new login of its own (what the
safe activation confirms over), closed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import gevent
from gevent.lock import BoundedSemaphore
from paramiko import Channel as ParamikoChannel
from paramiko import ChannelException, SSHException
from pyinfra import logger
from pyinfra.api.command import StringCommand
from pyinfra.api.exceptions import ConnectError
from pyinfra.connectors.ssh import SSHConnector
from pyinfra.connectors.util import make_unix_command_for_host, read_output_buffers, write_stdin

from operations.core.failures import DeployFailed

if TYPE_CHECKING:
    from pyinfra.api.facts import FactBase
    from pyinfra.api.host import Host

T = TypeVar("T")

# Seconds beyond a command's own timeout that a new login may take to connect.
CONNECT_TIMEOUT = 5

# Seconds to wait before each retry of a refused channel open (sshd's MaxSessions reached by
# someone else's sessions on the connection).
CHANNEL_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)


def run_local(
    args: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """
    Run ``args`` on the controller and capture its output as text.

    + args: the program and its arguments; a list, never a shell string
    + input: text for the process's stdin (the only way to hand it a secret); else stdin is empty
    + env: variables added to (or replacing) the controller's environment for this process
    + check: raise ``subprocess.CalledProcessError`` on a non-zero exit
    + timeout: seconds before the process is killed and ``subprocess.TimeoutExpired`` raised
    + pass_fds: descriptors the process inherits (every other one is closed in it)

    .. code:: python

        result = run_local(["ssh-keygen", "-y", "-f", "/dev/stdin"], input=private_key)
        result.returncode, result.stdout
    """
    if isinstance(args, str):
        raise TypeError(f"run_local takes an argument list, not the string {args!r}")
    merged = None if env is None else {**os.environ, **env}
    return subprocess.run(
        list(args),
        input=input if input is not None else "",
        env=merged,
        text=True,
        capture_output=True,
        check=check,
        timeout=timeout,
        pass_fds=tuple(pass_fds),
    )


def run_local_bounded(
    args: Sequence[str], *, input: str = "", timeout: float
) -> subprocess.CompletedProcess[str]:
    """
    ``run_local`` for a command nixpush does not control (the owner's ``on_failure``), that
    must never hold the run longer than ``timeout``: it runs in a process group of its own,
    and on timeout the whole group is killed (a ``sh -c`` would otherwise leave its child
    holding the output pipes open) before ``subprocess.TimeoutExpired`` is raised.

    .. code:: python

        run_local_bounded(["/usr/bin/curl", "-T", report, url], input=summary, timeout=60)
    """
    if isinstance(args, str):
        raise TypeError(f"run_local_bounded takes an argument list, not the string {args!r}")
    with subprocess.Popen(
        list(args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",  # a command nixpush does not control may print any bytes
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is gone already
                pass
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr)


def find_program(name: str) -> str | None:
    """
    The path of program ``name``: on PATH, else next to the running Python (a virtualenv's
    ``bin``, which is not on PATH when the venv's pyinfra is run without activating it).

    .. code:: python

        find_program("sops")  # "/tmp/venv/bin/sops"
    """
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


# -- remote: another inventory host ----------------------------------------------------

_CONNECTOR_CALLS = ("run_shell_command", "put_file", "get_file")


def limit_sessions(host: Host, limit: int) -> None:
    """
    Let at most ``limit`` commands, fact reads or file transfers use ``host``'s connection at
    once, and retry a refused channel open (``ChannelException``) with backoff before it
    counts as a failure. Idempotent: the first call for a host sets its bound.

    + host: an inventory host (its pyinfra connector is wrapped)
    + limit: concurrent sessions; keep it below the host's sshd ``MaxSessions``

    .. code:: python

        for host in state.inventory:
            limit_sessions(host, specs[host.name].max_ssh_sessions)
    """
    connector: Any = host.connector
    if getattr(connector, "nixpush_session_limit", None) is not None:
        return
    slots = BoundedSemaphore(limit)
    for name in _CONNECTOR_CALLS:
        setattr(connector, name, _bounded(getattr(connector, name), slots, host.name))
    connector.nixpush_session_limit = limit


def _bounded(call: Callable[..., T], slots: BoundedSemaphore, host_name: str) -> Callable[..., T]:
    def bounded(*args: Any, **kwargs: Any) -> T:
        for delay in (*CHANNEL_RETRY_DELAYS, None):
            with slots:
                try:
                    return call(*args, **kwargs)
                except SSHException as error:
                    # Refused at open: the command never started, so running it again is safe.
                    if delay is None or not channel_refused(error):
                        raise
                    logger.debug(f"{host_name}: SSH channel refused ({error}), retrying")
            gevent.sleep(delay)
        raise AssertionError("unreachable")

    return bounded


def channel_refused(error: BaseException) -> bool:
    """Whether paramiko failed to open a channel (sshd refused it, e.g. MaxSessions reached),
    as opposed to a lost connection: ``ChannelException``, or the bare ``SSHException`` it
    raises when the refusal carries no reason."""
    return isinstance(error, ChannelException) or str(error) == "Unable to open channel."


def connection_cause(host_name: str, error: BaseException) -> str:
    """What a connection error means, for a message: ``lost the SSH channel to nas (...)``."""
    if isinstance(error, TimeoutError):
        return f"timed out on {host_name}"
    detail = str(error) or type(error).__name__
    if channel_refused(error):
        return f"lost the SSH channel to {host_name} (sshd refused a session: {detail})"
    return f"lost the SSH connection to {host_name} ({detail})"


def run_on(
    target: Host,
    command: StringCommand,
    *,
    doing: str,
    sudo: bool,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: int | None = None,
) -> tuple[bool, list[str]]:
    """
    Run ``command`` on another inventory host; return its success and output lines.
    ``DeployFailed`` when the connection fails: ``lost the SSH channel to nas while {doing}``.

    + target: the host to run on (connected)
    + command: the command, built from quoted parts
    + doing: what the command is for, e.g. ``"evaluating pi4's system"``
    + sudo: run it with sudo (pyinfra applies no operation's ``_sudo`` here)
    + env, stdin, timeout: pyinfra's ``_env``, ``_stdin`` (never printed), ``_timeout``
    """
    kwargs: dict[str, Any] = {"_sudo": sudo}
    if env:
        kwargs["_env"] = env
    if stdin is not None:
        kwargs["_stdin"] = stdin
    if timeout is not None:
        kwargs["_timeout"] = timeout
    try:
        ok, output = target.run_shell_command(command, **kwargs)
    except (SSHException, OSError, EOFError, TimeoutError) as error:
        raise DeployFailed(f"{connection_cause(target.name, error)} while {doing}") from None
    return ok, output.output_lines


class LocalWriteError(DeployFailed):
    """Writing a file on the controller failed (a full disk, a read-only directory): the
    controller's problem, not the connection's."""


class _WriteFailed(Exception):
    """A write to the controller file failed: raised through the transfer, which would
    otherwise take an ``OSError`` for a lost connection."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Download:
    """The controller file a download writes into: the file object itself to pyinfra and
    paramiko (``seek``, ``write``), but a failed write is told from a lost connection."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            raise _WriteFailed(error) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def fetch_from(source: Host, remote: str, local: Path, *, doing: str) -> None:
    """
    Download ``remote`` from another inventory host into the controller file ``local``, over
    pyinfra's connection (SFTP for ssh). ``DeployFailed`` naming the host and ``doing`` when
    the transfer fails or the connection is lost; ``LocalWriteError`` naming ``local`` when
    the controller cannot write it (``[Errno 28] No space left on device``).

    .. code:: python

        fetch_from(builder.host, "/nix/store/...-iso/iso/nixos.iso", partial, doing="...")
    """
    try:
        with local.open("wb") as stream:  # closing flushes: a full disk may show only then
            try:
                ok = source.get_file(remote, _Download(stream))
            except (SSHException, OSError, EOFError, TimeoutError) as error:
                raise DeployFailed(
                    f"{connection_cause(source.name, error)} while {doing}"
                ) from None
    except (_WriteFailed, OSError) as failed:
        cause = failed.error if isinstance(failed, _WriteFailed) else failed
        raise LocalWriteError(
            f"cannot write {local} on the controller ({cause}) while {doing}"
        ) from None
    if not ok:
        raise DeployFailed(f"{source.name}: {doing} failed")


def read_on(target: Host, fact: type[FactBase[T]], *, sudo: bool, doing: str, **args: Any) -> T:
    """
    Read ``fact`` on another inventory host through ``run_on``: its ``process()``ed answer,
    or its default when the command printed nothing. ``DeployFailed`` when the command fails
    or the connection is lost, so "could not read" never reads as "missing".

    .. code:: python

        read_on(builder, File, path=DEPLOY_KEY_PATH, sudo=True, doing="checking ...")
    """
    instance = fact()
    lines = read_lines_on(target, StringCommand(instance.command(**args)), sudo=sudo, doing=doing)
    return instance.process(lines) if lines else instance.default()


def read_lines_on(target: Host, command: StringCommand, *, sudo: bool, doing: str) -> list[str]:
    """``run_on``'s output lines; ``DeployFailed`` when the command fails (``read_on``)."""
    ok, lines = run_on(target, command, sudo=sudo, doing=doing)
    if not ok:
        last = lines[-1].strip() if lines else "no output"
        raise DeployFailed(f"{target.name}: {doing} failed: {last}")
    return lines


# -- a new SSH login from the controller -----------------------------------------------

# pyinfra's words for a login that was made and refused (``raise_connect_error``): an answer
# (the host is up, new logins fail), unlike a connection that could not be made at all.
_REFUSED = ("Authentication error", "SSH host key error")


def fresh_login_run(
    target: Host,
    command: StringCommand,
    *,
    sudo: bool,
    timeout: float,
    stdin: str | None = None,
) -> tuple[bool, list[str]] | None:
    """
    Run ``command`` over a new SSH login to ``target``, closed afterwards: a login of exactly
    the kind pyinfra makes (the host's own connector and ssh data: address, port, user, key,
    known hosts and strictness), sharing nothing with its running connection. It never
    prompts: a sudo that wants a password is an answer (pyinfra would ask for one).

    Returns (success, output lines); ``(False, [why])`` when the login itself was refused
    (authentication, host key); None when no connection could be made, or it broke, within
    ``timeout`` + ``CONNECT_TIMEOUT`` seconds.

    .. code:: python

        fresh_login_run(host, confirm_command(run), sudo=True, timeout=20)  # (True, [])
    """
    connector: Any = type(target.connector)(target.state, target)
    limit = gevent.Timeout(timeout + CONNECT_TIMEOUT)
    limit.start()
    try:
        try:
            connector.connect()
        except ConnectError as error:
            refused = str(error).startswith(_REFUSED)
            return (False, [f"the login was refused: {error}"]) if refused else None
        return _run_unprompted(connector, target, command, sudo, timeout, stdin)
    except gevent.Timeout as error:
        if error is not limit:
            raise
        return None
    except Exception:  # paramiko, socket: no answer
        return None
    finally:
        limit.cancel()
        _close_login(getattr(connector, "client", None))


def _run_unprompted(
    connector: Any,
    target: Host,
    command: StringCommand,
    sudo: bool,
    timeout: float,
    stdin: str | None,
) -> tuple[bool, list[str]]:
    """``command`` on a connected connector, without pyinfra's sudo-password prompt and retry
    (``SSHConnector.run_shell_command``); other connectors (``@local``) run it their way."""
    if not isinstance(connector, SSHConnector) or connector.client is None:
        kwargs: dict[str, Any] = {"_sudo": sudo, "_timeout": timeout}
        if stdin is not None:
            kwargs["_stdin"] = stdin
        ok, output = connector.run_shell_command(command, **kwargs)
        return ok, output.output_lines
    unix = make_unix_command_for_host(target.state, target, command, _sudo=sudo)
    stdin_buffer, stdout_buffer, stderr_buffer = connector.client.exec_command(unix.get_raw_value())
    if stdin is not None:
        write_stdin(stdin, stdin_buffer)  # type: ignore[no-untyped-call]
    stdin_buffer.close()
    output = read_output_buffers(
        stdout_buffer, stderr_buffer, timeout=int(timeout), print_output=False, print_prefix=""
    )
    return stdout_buffer.channel.recv_exit_status() == 0, output.output_lines


def drop_connection(target: Host) -> None:
    """Close pyinfra's own connection to ``target`` (its sshd went away: a reboot) and mark it
    disconnected; ``target.connect()`` makes a new one. pyinfra's ssh connector closes nothing
    on ``disconnect``."""
    _close_login(getattr(target.connector, "client", None))
    target.disconnect()


def _close_login(client: Any) -> None:
    """Close a new login's client and every ProxyJump hop it went through (paramiko closes
    only the last connection; each hop is a channel on the previous hop's transport)."""
    if client is None:
        return
    transport = client.get_transport()
    client.close()
    sock = getattr(transport, "sock", None)
    while isinstance(sock, ParamikoChannel):
        hop = sock.get_transport()
        sock = getattr(hop, "sock", None)
        hop.close()
