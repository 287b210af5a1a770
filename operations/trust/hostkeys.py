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

from operations.core.files import write_atomically
from operations.core.grammar import address_problem, is_host_key
from operations.trust.ssh import known_hosts_name

Member = tuple[str, Mapping[str, Any]]


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
    line = f"{known_hosts_name(hostname, port)} {key_type} {blob}\n"
    path = _directory() / hashlib.sha256(line.encode()).hexdigest()[:20]
    if not path.exists():
        write_atomically(path, line, 0o600)
    return {
        **data,
        "ssh_known_hosts_file": str(path),
        "ssh_strict_host_key_checking": data.get("ssh_strict_host_key_checking") or "yes",
    }


def pin_host_keys(members: Sequence[Member]) -> list[tuple[str, dict[str, Any]]]:
    """
    An inventory group's ``(name, data)`` members, each ``pinned``.

    .. code:: python

        minimal = pin_host_keys([("pi4", {...}), ("nas", {...})])
    """
    return [(name, pinned(data)) for name, data in members]
