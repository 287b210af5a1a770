"""
Which of a host's addresses answers: a host may be reached several ways (its LAN name, then its
tailnet name), tried in order. A short TCP connect to the SSH port says whether anything listens
there; the first address that answers is the one pyinfra and the builder use.

Every address of every host is tried at once (one thread each), so a run waits at most
``PROBE_TIMEOUT`` for all of them, however many hosts are away; a host with one address is
never probed (pyinfra's own connection says whether it answers).

.. code:: python

    answering({"laptop": (("laptop.lan", "laptop.tail.ts.net"), 22)})
    # {"laptop": "laptop.tail.ts.net"} when only the tailnet answers; None when none does
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

# Seconds a run waits for the addresses to answer: a LAN or a tailnet peer answers a TCP
# connect in milliseconds; one that does not answer in this time is not worth an SSH login.
PROBE_TIMEOUT = 2.0
# The most connects in flight at once (a fleet of 64 Pis with two addresses each: one round).
_MAX_PROBES = 128

Probe = Callable[[str, int, float], bool]


def tcp_answers(address: str, port: int, timeout: float) -> bool:
    """Whether ``address:port`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, timed out, a name that does not resolve
        return False


def answering(
    hosts: Mapping[str, tuple[Sequence[str], int]],
    probe: Probe = tcp_answers,
    timeout: float = PROBE_TIMEOUT,
) -> dict[str, str | None]:
    """
    Each host's first address (in its order) that answers on its port, or None when none
    does. Hosts with a single address get it unprobed.

    + hosts: host name -> (its addresses, in order; its SSH port)
    + probe: how an address is tried (``tcp_answers``; tests pass their own)
    + timeout: seconds each try may take (all run at once)
    """
    result: dict[str, str | None] = {}
    tries: list[tuple[str, str, int]] = []
    for name, (addresses, port) in hosts.items():
        if len(addresses) == 1:
            result[name] = addresses[0]
        elif addresses:
            tries.extend((name, address, port) for address in addresses)
        else:
            result[name] = None
    if not tries:
        return result
    with ThreadPoolExecutor(max_workers=min(len(tries), _MAX_PROBES)) as pool:
        answers = list(pool.map(lambda t: probe(t[1], t[2], timeout), tries))
    for (name, address, _), answered in zip(tries, answers, strict=True):
        if answered and result.get(name) is None:
            result[name] = address
        result.setdefault(name, None)
    return result
