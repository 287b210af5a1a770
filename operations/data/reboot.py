"""
Reboots as data: whether nixpush reboots a target after a confirmed switch (``reboot``), how
long it waits for it to come back (``reboot_timeout``), and the command that reboots it
(``reboot_command``), parsed once per host into a frozen ``Reboot``.

``reboot_command`` exists so that nixpush never reboots anything it was not told to: the
default is the real one (``systemctl reboot``), and the bench points it at its stand-in.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REBOOT_KEYS = ("reboot", "reboot_timeout", "reboot_command")
DEFAULT_REBOOT_COMMAND: tuple[str, ...] = ("systemctl", "reboot")
# Long enough for a Pi's firmware, kernel and stage 2 (a minute or two); raise it for a host
# with slow disks or a slow firmware.
DEFAULT_REBOOT_TIMEOUT = 300
_MAX_REBOOT_TIMEOUT = 3600


class RebootPolicy(enum.Enum):
    """When a confirmed switch is followed by a reboot."""

    NEVER = "never"
    WHEN_NEEDED = "when-needed"
    ALWAYS = "always"


REBOOT_POLICIES = tuple(p.value for p in RebootPolicy)


@dataclass(frozen=True)
class Reboot:
    """
    A host's reboot data.

    + policy: ``never`` (the default), ``when-needed`` (the new system's kernel, initrd,
      modules or kernel parameters differ from the booted one's) or ``always``
    + timeout: seconds nixpush waits for SSH after the reboot
    + command: what reboots the host, run as root on it (an argument list)
    """

    policy: RebootPolicy = RebootPolicy.NEVER
    timeout: int = DEFAULT_REBOOT_TIMEOUT
    command: tuple[str, ...] = DEFAULT_REBOOT_COMMAND

    def wanted(self, needed: bool) -> bool:
        """Whether a confirmed switch reboots: ``Reboot(RebootPolicy.ALWAYS).wanted(False)``."""
        return self.policy is RebootPolicy.ALWAYS or (
            self.policy is RebootPolicy.WHEN_NEEDED and needed
        )


def parse_reboot(data: Callable[[str], Any], problem: Callable[[str, str], None]) -> Reboot:
    """
    ``Reboot`` from a host's data (``data(key)``: its value or None); each bad key is reported
    through ``problem(key, text)`` and left at its default.
    """
    policy = RebootPolicy.NEVER
    value = data("reboot")
    if value is not None:
        try:
            policy = RebootPolicy(value)
        except ValueError:
            problem("reboot", f"is {value!r}; set it to one of {', '.join(REBOOT_POLICIES)}")
    timeout = DEFAULT_REBOOT_TIMEOUT
    value = data("reboot_timeout")
    if value is not None:
        if isinstance(value, str) and value.strip().isdecimal():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            value = -1
        if 1 <= value <= _MAX_REBOOT_TIMEOUT:
            timeout = value
        else:
            problem(
                "reboot_timeout", f"is {data('reboot_timeout')!r}; set it to a number of "
                f"seconds from 1 to {_MAX_REBOOT_TIMEOUT}",
            )  # fmt: skip
    command = DEFAULT_REBOOT_COMMAND
    value = data("reboot_command")
    if value is not None:
        if (
            isinstance(value, list | tuple)
            and value
            and all(
                isinstance(word, str) and word and not set(word) & {"\n", "\0"} for word in value
            )
        ):
            command = tuple(value)
        else:
            problem(
                "reboot_command", f"is {value!r}; set it to the command as a list of words, "
                "e.g. ['systemctl', 'reboot']",
            )  # fmt: skip
    return Reboot(policy, timeout, command)
