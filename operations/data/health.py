"""
Health checks: what must hold on a target after its activation before the deploy confirms it
(see ``operations.push.activate``). A failed check means no confirmation, so the target rolls back.

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
are merged by ``dest`` (``operations.trust.secrets.host_secrets``): host data and ``--data``
replace a check of the same name; two roots declaring one name differently is an error. The
fleet's check (``operations.data.fleet``) parses them with ``parse_check`` into
``HostSpec.health_checks``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

KINDS = ("command", "units", "url")
_FIELDS = ("name", *KINDS, "timeout", "retries")
DEFAULT_TIMEOUT = 10
DEFAULT_RETRIES = 2
RETRY_INTERVAL = 2.0
_MAX_TIMEOUT = 600
_MAX_RETRIES = 20
_UNIT = re.compile(r"[A-Za-z0-9@:._\\-]+")
_URL = re.compile(r"https?://[^\s]+")


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
