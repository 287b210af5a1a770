"""
The host keys the controller's own connections check: a host whose data has ``ssh_host_key``
is pinned to it, so pyinfra connects only when the host answers with that key, and the
controller never depends on a first contact (a re-imaged Pi, a new controller, the timer's user
with a known_hosts file of its own).

pyinfra's SSH connector reads the host keys it trusts from one file per host
(``ssh_known_hosts_file``) and, with ``ssh_strict_host_key_checking = "yes"``, refuses a host
whose key is not there. It connects to every inventory host before any deploy code runs, so
the pin is made where the inventory is written: ``pin_host_keys`` gives each host with
``ssh_host_key`` a known_hosts file holding that key alone (in a directory of this process's,
0700, removed when it exits) and strict checking, unless the data sets the checking itself.

.. code:: python

    # inventory.py
    from operations.trust.hostkeys import pin_host_keys

    pis = pin_host_keys([
        ("pi4", {"ssh_hostname": "192.168.1.122", "ssh_port": 8023,
                 "ssh_host_key": "ssh-ed25519 AAAA..."}),
    ])

The line is written for ``ssh_hostname`` and ``ssh_port`` as given: an ``ssh_config`` Host
alias whose ``HostName`` differs makes pyinfra look the key up under that name, and fail.

A host reached several ways has a list in ``ssh_hostname`` (its LAN name first, then its
tailnet name): ``choose_addresses`` (which ``pin_host_keys`` calls first) tries them in order
before pyinfra connects (``operations.core.addresses``), sets ``ssh_hostname`` to the first that
answers (the first of all when none does: pyinfra then fails to connect, and the summary names
every address tried) and keeps the list in ``ssh_addresses``; the pinned line names them all.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from operations.core.addresses import answering
from operations.core.files import write_atomically
from operations.core.grammar import address_problem, is_host_key
from operations.trust.ssh import known_hosts_name

Member = tuple[str, Mapping[str, Any]]
# Where choose_addresses keeps a host's addresses, in order, once ssh_hostname is the chosen one.
ADDRESSES_KEY = "ssh_addresses"
# What each list of addresses answered, once per process: an inventory lists a host in several
# groups, and the answer must be the same in each (and cost one probe).
_ANSWERED: dict[tuple[tuple[str, ...], int], str | None] = {}


@functools.cache
def _directory() -> Path:
    """This process's directory of pinned known_hosts files (mkdtemp: 0700, unique)."""
    path = Path(tempfile.mkdtemp(prefix="nixpush-known-hosts-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _port(value: Any) -> int | None:
    if value is None:
        return 22
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.isdecimal() else None


def pinned(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    ``data`` with ``ssh_known_hosts_file`` set to a file holding its ``ssh_host_key`` for its
    ``ssh_hostname`` and ``ssh_port``, and ``ssh_strict_host_key_checking`` ``"yes"`` unless
    set. Unchanged when it has no key or address, or either is malformed (the fleet check
    refuses those, naming the fix).

    .. code:: python

        pinned({"ssh_hostname": "pi4.lan", "ssh_host_key": "ssh-ed25519 AAAA..."})
    """
    key, hostname = data.get("ssh_host_key"), data.get("ssh_hostname")
    port = _port(data.get("ssh_port"))
    if not isinstance(key, str) or not isinstance(hostname, str) or port is None:
        return dict(data)
    if not is_host_key(key) or address_problem(hostname) is not None:
        return dict(data)
    key_type, blob = key.split()[:2]
    addresses = _addresses(data) or (hostname,)
    if any(address_problem(address) is not None for address in addresses):
        return dict(data)
    names = ",".join(known_hosts_name(address, port) for address in addresses)
    line = f"{names} {key_type} {blob}\n"
    path = _directory() / hashlib.sha256(line.encode()).hexdigest()[:20]
    if not path.exists():
        write_atomically(path, line, 0o600)
    return {
        **data,
        "ssh_known_hosts_file": str(path),
        "ssh_strict_host_key_checking": data.get("ssh_strict_host_key_checking") or "yes",
    }


def _addresses(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get(ADDRESSES_KEY)
    if isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        return tuple(value)
    return ()


def _address_list(data: Mapping[str, Any]) -> tuple[str, ...] | None:
    """``ssh_hostname`` as a list of well-formed addresses, else None (a string, or a list the
    fleet check refuses, naming the fix)."""
    value = data.get("ssh_hostname")
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(a, str) and address_problem(a) is None for a in value):
        return None
    return tuple(value)


def choose_addresses(members: Sequence[Member]) -> list[tuple[str, dict[str, Any]]]:
    """
    An inventory group's ``(name, data)`` members, each whose ``ssh_hostname`` is a list of
    addresses given the first that answers (all hosts tried at once, a few seconds at most)
    and ``ssh_addresses``, the list. Others are unchanged, and cost nothing.

    .. code:: python

        pis = choose_addresses([("laptop", {"ssh_hostname": ["laptop.lan", "laptop.ts.net"]})])
    """
    wanted: dict[str, tuple[tuple[str, ...], int]] = {}
    for name, data in members:
        addresses, port = _address_list(data), _port(data.get("ssh_port"))
        if addresses is not None and port is not None and (addresses, port) not in _ANSWERED:
            wanted[name] = (addresses, port)
    for name, answer in answering(wanted).items():
        _ANSWERED[wanted[name]] = answer
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name, data in members:
        addresses, port = _address_list(data), _port(data.get("ssh_port"))
        if addresses is None or port is None:
            chosen.append((name, dict(data)))
            continue
        address = _ANSWERED[(addresses, port)] or addresses[0]
        chosen.append((name, {**data, "ssh_hostname": address, ADDRESSES_KEY: list(addresses)}))
    return chosen


def pin_host_keys(members: Sequence[Member]) -> list[tuple[str, dict[str, Any]]]:
    """
    An inventory group's ``(name, data)`` members, their addresses chosen
    (``choose_addresses``), each ``pinned``.

    .. code:: python

        minimal = pin_host_keys([("pi4", {...}), ("nas", {...})])
    """
    return [(name, pinned(data)) for name, data in choose_addresses(members)]
