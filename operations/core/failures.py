"""
How nixpush fails: one host, or the whole run. The rule:

- **Bad input stops the run.** Data that breaks the contract (``FleetError``, ``SecretError``,
  ``SopsError``, ``ScheduleError``: all ``PyinfraError``) is raised from deploy code at
  prepare time, before any host changes, and names the host, the key and the fix.
- **A problem of one host fails that host only**, and the others go on: an unreachable
  builder, a configuration that does not evaluate, a lost SSH channel, a failed build, copy or
  activation, a host that lacks what an operation needs.
  - planning code (deploy code, prepare time) raises ``DeployFailed``; the deploy runs it
    through ``or_unable``, which calls ``report_unable``;
  - an operation body yields ``fail_host(reason)``;
  - a ``FunctionCommand`` returns ``fail(host, reason)``, or raises ``DeployFailed`` from a
    function wrapped in ``host_step``.

Why not just raise: an exception raised in an operation body escapes pyinfra's per-host
handling and aborts the whole run (``pyinfra_cli.util._parallel_load_hosts`` re-raises it at
prepare time; ``operations._run_single_op`` re-raises it at execute time). A
``FunctionCommand`` returning ``False`` is pyinfra's own per-host failure. Every way records the
cause for the run's summary and report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.operation import operation
from pyinfra.context import host as current_host
from pyinfra.facts.server import User

from operations.core.runstate import summary_for

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


T = TypeVar("T")


class DeployFailed(Exception):
    """A step failed on one host; the message names the host, the cause and the fix."""


def fail(host: Host, reason: str) -> bool:
    """Log ``reason`` for ``host``, record it for the summary, and return False: what a
    ``FunctionCommand`` returns to fail only that host."""
    return _log_and_fail(host.state, host, reason)


def _log_and_fail(state: State, host: Host, reason: str) -> bool:
    host.log_styled(f"failed: {reason}", fg="red", log_func=logger.error)
    summary_for(state).fail(host.name, reason)
    return False


def host_step(function: Callable[..., bool]) -> Callable[..., bool]:
    """Make ``function`` (a ``FunctionCommand`` body, ``(state, host, ...) -> bool``) fail
    only its host when it raises: ``DeployFailed``'s message is the cause; any other exception
    is named in one line instead of pyinfra's traceback."""

    @wraps(function)
    def step(state: State, host: Host, *args: Any, **kwargs: Any) -> bool:
        try:
            return function(state, host, *args, **kwargs)
        except DeployFailed as failure:
            return fail(host, str(failure))
        except Exception as error:  # a bug in one host's step fails that host, in one line
            return fail(
                host, f"{function.__name__.lstrip('_')} failed: {type(error).__name__}: {error}"
            )

    return step


def fail_host(reason: str) -> FunctionCommand:
    """A command that, when executed, fails the current host with ``reason`` (the others go
    on): ``yield fail_host("nas: nix is not installed")``."""
    return FunctionCommand(_log_and_fail, (reason,), {})


@operation(is_idempotent=False)
def unable(reason: str) -> Generator[PyinfraCommand, None, None]:
    """
    Fail the current host with ``reason`` when executed (the others go on).

    + reason: what is wrong and how to fix it; recorded for the run's summary

    **Example:**

    .. code:: python

        failures.unable(name="Fail: cannot deploy", reason="builder nas is unreachable")
    """
    yield fail_host(reason)


def report_unable(reason: str) -> None:
    """Log a planning failure of the current host now (so ``--dry`` shows it), record it, and
    add an operation that fails the host when the run executes."""
    current_host.log_styled(f"cannot deploy: {reason}", fg="red", log_func=logger.error)
    summary_for(current_host.state).fail(current_host.name, reason)
    unable(name="Fail: cannot deploy", reason=reason)


@dataclass(frozen=True)
class Unable:
    """Why planning a host failed: ``attempt``'s answer instead of the plan."""

    cause: str


def attempt(what: str, compute: Callable[[], T]) -> T | Unable:
    """
    ``compute()`` (planning code, prepare time), or ``Unable(cause)`` when it raises:
    ``DeployFailed``'s message is the cause; any other exception (a bug) is named in one line,
    ``{what} failed: KeyError: ...``. For a host other than the current one (``or_unable`` is
    for the current host).

    .. code:: python

        planned = attempt(f"planning {spec.name}", lambda: plan_deploy(...))
        if isinstance(planned, Unable):
            summary.fail(spec.name, planned.cause)
    """
    try:
        return compute()
    except DeployFailed as failure:
        return Unable(str(failure))
    except Exception as error:  # one host's bug must not stop the others
        return Unable(f"{what} failed: {type(error).__name__}: {error}")


def or_unable(what: str, compute: Callable[[], T]) -> T | None:
    """
    ``compute()`` for the current host (``attempt``), or None after ``report_unable`` when it
    raises, which fails only the current host.

    .. code:: python

        planned = or_unable(f"planning {host.name}", lambda: plan_deploy(...))
    """
    result = attempt(what, compute)
    if isinstance(result, Unable):
        report_unable(result.cause)
        return None
    return result


def require_root(why: str) -> None:
    """Raise a clear OperationError (bad input: the run stops) unless the current operation's
    commands run as root. Plain sudo (no other user to become) runs them as root: the host is
    asked only otherwise."""
    args: dict[str, Any] = dict(current_host.current_op_global_arguments or {})
    if args.get("_sudo") and args.get("_sudo_user") in (None, "root"):
        if not any(args.get(other) for other in ("_su_user", "_doas")):
            return
    user = current_host.get_fact(User)
    if user != "root":
        raise OperationError(
            f"{current_host.name}: connected as {user!r}, not root, and {why}; "
            "set _sudo=True in its host or group data",
        )
