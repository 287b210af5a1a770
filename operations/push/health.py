"""
Running health checks on a target after its activation (see ``operations.push.activate``):
each check's command, its retries, the confirmation window it must fit in. The checks
themselves are data, parsed by ``operations.data.health``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import unquote, urlsplit

import gevent
from pyinfra.api.command import QuoteString, StringCommand

from operations.data.health import RETRY_INTERVAL, HealthCheck, redacted
from operations.push.switch import script

# One GET of a URL on the target (fetch.sh: curl, else wget); positional values only.
_FETCH = script("fetch.sh")

# Whether the target has curl, which a URL check with credentials needs (fetch.sh says why).
CURL_PROBE = StringCommand("sh", "-c", QuoteString("command -v curl"))


def has_credentials(check: HealthCheck) -> bool:
    """A URL check whose URL carries a user (and password): they go to curl on stdin."""
    return check.kind == "url" and redacted(check.url) != check.url


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@``: what a command line may show."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    if not userinfo:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest[len(userinfo) + 1 :]}"


def curl_config(url: str) -> str:
    """curl's config (``curl -K -`` reads it from stdin) giving the URL's user and password,
    as curl would read them from the URL (percent-decoded); empty without them. In curl's
    quoted config values a backslash escapes the next character (``\\n`` is a newline)."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    if not userinfo:
        return ""
    user, _, password = userinfo.partition(":")
    value = f"{unquote(user)}:{unquote(password)}"
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r")):
        value = value.replace(raw, escaped)
    return f'user = "{value}"\n'


def curl_problem(check: HealthCheck) -> str:
    """Why ``check`` cannot run on a target without curl."""
    return (
        f"health check {check.name!r} sends a user and password, which nixpush gives only to "
        "curl (on stdin), and the target has no curl (busybox wget takes them only in its "
        "command line, which every user and sudo's log see): add curl to the target's "
        "system, or drop the URL's user:password@"
    )


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
        # The URL's credentials, if any, go on stdin (check_input), never in a command line:
        # /proc/*/cmdline shows it to every user, sudo logs it.
        credentials = "1" if has_credentials(check) else "0"
        return StringCommand(
            "sh", "-c", QuoteString(_FETCH), "nixpush-health",
            QuoteString(without_userinfo(check.url)), seconds, credentials,
        )  # fmt: skip
    return StringCommand("timeout", seconds, "sh", "-c", QuoteString(check.command))


def check_input(check: HealthCheck) -> str | None:
    """What one attempt of ``check`` reads on stdin: a URL's credentials (``curl_config``)."""
    return curl_config(check.url) if has_credentials(check) else None


# Runs a command (its timeout, its stdin) on the target: (success, output lines), or None when
# the target could not be reached (``activate.Channel.run``).
Runner = Callable[[StringCommand, float, "str | None"], "tuple[bool, list[str]] | None"]


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
            result = run(check_command(check), check.timeout + 15, check_input(check))
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
