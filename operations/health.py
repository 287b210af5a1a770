"""
Health checks: what must hold on a target after its activation before the deploy confirms it
(see ``operations.activation``). A failed check means no confirmation, so the target rolls back.

Checks are data (``health_checks``, per host or per root) like:

.. code:: python

    health_checks = [
        {"name": "sshd", "units": ["sshd.service"]},
        {"name": "tailnet up", "command": "tailscale status --peers=false", "timeout": 10},
        {"name": "syncthing", "url": "http://127.0.0.1:8384/rest/noauth/health", "retries": 5},
    ]

Each entry has exactly one of ``command`` (a shell command run on the target as root; exit 0
passes), ``units`` (systemd units that must be active; skipped where the target has no systemd)
or ``url`` (fetched on the target with curl or wget; a 2xx/3xx answer passes), and optionally
``name`` (default: derived from the check), ``timeout`` (seconds per attempt, default 10) and
``retries`` (further attempts after a failure, 2 s apart, default 2).

A host gets the checks of every root it is in plus its own, merged by ``name`` like ``secrets``
are merged by ``dest`` (``operations.secrets.host_secrets``): host data and ``--data`` replace a
check of the same name; two roots declaring one name differently is an error. The fleet's check
(``operations.fleet``) parses them with ``parse_check`` into ``HostSpec.health_checks``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import gevent
from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.hiddenvalue import HiddenValue

KINDS = ("command", "units", "url")
_FIELDS = ("name", *KINDS, "timeout", "retries")
DEFAULT_TIMEOUT = 10
DEFAULT_RETRIES = 2
RETRY_INTERVAL = 2.0
_MAX_TIMEOUT = 600
_MAX_RETRIES = 20
_UNIT = re.compile(r"[A-Za-z0-9@:._\\-]+")
_URL = re.compile(r"https?://[^\s]+")
# curl where there is one (NixOS usually), else wget (busybox has one); positional values only.
_FETCH = (
    'if command -v curl >/dev/null 2>&1; then exec curl -fsS -o /dev/null --max-time "$2" -- "$1"; '
    'else exec wget -q -O /dev/null -T "$2" -- "$1"; fi'
)


@dataclass(frozen=True, kw_only=True)
class HealthCheck:
    """
    One check, parsed from a ``health_checks`` entry.

    + name: how messages name it (unique per host)
    + kind: ``command``, ``units`` or ``url``
    + command, units, url: what to check (the field of ``kind``)
    + timeout: seconds per attempt
    + retries: further attempts after a failed one
    """

    name: str
    kind: str
    command: str = ""
    units: tuple[str, ...] = ()
    url: str = ""
    timeout: int = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @property
    def needs_systemd(self) -> bool:
        return self.kind == "units"

    @property
    def worst_case(self) -> float:
        """Seconds it takes at most: every attempt timing out, with the pauses between them."""
        return (self.retries + 1) * self.timeout + self.retries * RETRY_INTERVAL

    @property
    def description(self) -> str:
        """``check.description == "sshd: units sshd.service active"``."""
        if self.kind == "units":
            what = f"units {' '.join(self.units)} active"
        elif self.kind == "url":
            what = f"GET {redacted(self.url)}"
        else:
            what = f"command {self.command!r}"
        return f"{self.name}: {what}"


def redacted(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) replaced by ``***``, for logs:
    ``redacted("http://u:p@host/x") == "http://***@host/x"``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


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


# -- data ------------------------------------------------------------------------------


def _number(entry: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} is {value!r}; set it to a whole number from {low} to {high}")
    return value


def parse_check(entry: Any) -> tuple[HealthCheck | None, list[str]]:
    """One ``health_checks`` entry as a ``HealthCheck``, or None and its problems (each a fix)."""
    if not isinstance(entry, Mapping):
        return None, [f'entry {entry!r} is not a mapping; write it like {{"command": "..."}}']
    problems: list[str] = []
    unknown = [str(key) for key in entry if key not in _FIELDS]
    if unknown:
        problems.append(f"has unknown fields {', '.join(unknown)}; use only {', '.join(_FIELDS)}")
    kinds = [kind for kind in KINDS if kind in entry]
    if len(kinds) != 1:
        return None, [*problems, "needs exactly one of command, units, url"]
    kind = kinds[0]
    value = entry[kind]
    fields: dict[str, Any] = {}
    if kind == "command":
        if not isinstance(value, str) or not value.strip():
            problems.append(f"command is {value!r}; set it to a shell command")
        fields["command"] = value
    elif kind == "units":
        units = [value] if isinstance(value, str) else value
        if (
            not isinstance(units, list | tuple)
            or not units
            or not all(isinstance(u, str) and _UNIT.fullmatch(u) for u in units)
        ):
            problems.append(f'units is {value!r}; set it to unit names like ["sshd.service"]')
        else:
            fields["units"] = tuple(units)
    elif not isinstance(value, str) or not _URL.fullmatch(value):
        problems.append(f'url is {value!r}; set it to an http(s) URL like "http://127.0.0.1/"')
    else:
        fields["url"] = value
    for key, default, high in (
        ("timeout", DEFAULT_TIMEOUT, _MAX_TIMEOUT),
        ("retries", DEFAULT_RETRIES, _MAX_RETRIES),
    ):
        try:
            fields[key] = _number(entry, key, default, 0 if key == "retries" else 1, high)
        except ValueError as error:
            problems.append(str(error))
    name = entry.get("name")
    if name is None:
        shown = redacted(value) if kind == "url" and isinstance(value, str) else value
        name = f"{kind} {' '.join(shown) if isinstance(shown, list | tuple) else shown}"
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        problems.append(f"name is {name!r}; set it to a one-line text")
    if problems:
        return None, problems
    return HealthCheck(name=str(name), kind=kind, **fields), []


# -- running ---------------------------------------------------------------------------

# Runs a command on the target: (success, output lines), or None when the target could not be
# reached (operations.activation's channel).
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
