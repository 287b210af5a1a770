"""
Running health checks on a target after its activation (see ``operations.push.activate``):
each check's command, its retries, the confirmation window it must fit in. The checks
themselves are data, parsed by ``operations.data.health``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import gevent
from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.hiddenvalue import HiddenValue

from operations.data.health import RETRY_INTERVAL, HealthCheck, redacted
from operations.push.switch import script

# One GET of a URL on the target (fetch.sh: curl, else wget); positional values only.
_FETCH = script("fetch.sh")


def _without_credentials(text: str, check: HealthCheck) -> str:
    """A line of a check's output, with its URL's credentials masked (wget may echo the URL)."""
    if check.kind != "url" or redacted(check.url) == check.url:
        return text
    userinfo = urlsplit(check.url).netloc.rpartition("@")[0]
    return text.replace(check.url, redacted(check.url)).replace(userinfo, "***")


def check_command(check: HealthCheck) -> StringCommand:
    """The command one attempt of ``check`` runs on the target; exit 0 passes."""
    seconds = str(check.timeout)
    if check.kind == "units":
        units = (QuoteString(unit) for unit in check.units)
        return StringCommand("timeout", seconds, "systemctl", "is-active", "--quiet", "--", *units)
    if check.kind == "url":
        # The URL's credentials, if any, reach curl but never a printed command (pyinfra's -v).
        url = HiddenValue(check.url, redacted(check.url))  # type: ignore[no-untyped-call]
        return StringCommand(
            "sh", "-c", QuoteString(_FETCH), "nixpush-health", QuoteString(url), seconds
        )
    return StringCommand("timeout", seconds, "sh", "-c", QuoteString(check.command))


# Runs a command on the target: (success, output lines), or None when the target could not be
# reached (``operations.push.activate``'s channel).
Runner = Callable[[StringCommand, float], "tuple[bool, list[str]] | None"]


def run_checks(
    checks: Sequence[HealthCheck],
    *,
    systemd: bool,
    run: Runner,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = gevent.sleep,
    window: tuple[float, Callable[[], float]] | None = None,
) -> str | None:
    """
    Run ``checks`` in order, each with its retries; the first failure's cause, else None.

    + checks: the host's checks
    + systemd: whether the target has systemd (``units`` checks are skipped without it)
    + run: how to run a command on the target
    + log: where to say what passed, was skipped or failed
    + window: (the deadline, the clock it is on): a check still not passed when it closes is
      reported as outlasting it, and nothing more is run
    """
    for check in checks:
        if check.needs_systemd and not systemd:
            log(f"health check {check.description}: skipped, the target has no systemd")
            continue
        detail = ""
        for attempt in range(check.retries + 1):
            if attempt:
                sleep(RETRY_INTERVAL)
            if window is not None and window[1]() >= window[0]:
                return (
                    f"health check {check.name!r} outlasted the confirmation window "
                    f"({attempt} attempt{'s' if attempt != 1 else ''} made"
                    f"{f', last: {detail}' if detail else ''})"
                )
            result = run(check_command(check), check.timeout + 15)
            if result is not None and result[0]:
                log(f"health check {check.description}: passed")
                break
            if result is None:
                detail = "the target could not be reached"
            else:
                last = [line.strip() for line in result[1] if line.strip()]
                detail = _without_credentials(last[-1], check) if last else "failed without output"
        else:
            tries = check.retries + 1
            return (
                f"health check {check.name!r} failed after {tries} "
                f"attempt{'s' if tries != 1 else ''}: {detail}"
            )
    return None
