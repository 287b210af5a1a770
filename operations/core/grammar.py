"""
The grammar of the names and addresses nixpush puts into commands, URLs, Nix files and file
names: inventory host names, SSH addresses, account names, one-line paths. Each is checked
whole (``re.fullmatch``: a pattern ending in ``$`` would let a trailing newline through), so a
value can't carry a second line into a generated file nor a ``?`` or ``&`` into a store URL
(``ssh-ng://USER@ADDRESS?remote-program=...``).

.. code:: python

    is_host_name("pi4")                   # True; "../x" and "pi4\\n" are not
    address_problem("pi4.lan")            # None: a DNS name (or an IPv4 address) is fine
    address_problem("pi4.lan?ssh-key=x")  # "is not a DNS name or an IPv4 address"
    is_account_name("beau")               # True
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

# An inventory host's name: it names files (fragments), Nix attributes and SSH aliases.
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# An account name as useradd and chown take it (upper case too; a trailing $ for Samba
# machine accounts). Names, never numeric ids: facts read names back, so an id would never
# compare equal and every run would chown again.
ACCOUNT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
# A DNS name (RFC 1123 labels; "_" too, which ssh_config aliases and /etc/hosts accept),
# optionally ending in the root's dot.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_NUMERIC = re.compile(r"[0-9.]+")
_MAX_DNS_NAME = 253
# An SSH public key's type: ssh-ed25519, ecdsa-sha2-nistp256, sk-ssh-ed25519@openssh.com.
_KEY_TYPE = re.compile(r"(ssh|ecdsa|sk)-[a-z0-9@.-]+")
# Characters no path, name or address nixpush writes anywhere may hold.
_LINE_BREAKS = ("\n", "\r", "\0")


def is_host_name(name: str) -> bool:
    """An inventory host name: a letter or digit, then letters, digits, ``.``, ``_``, ``-``."""
    return HOST_NAME.fullmatch(name) is not None


def is_account_name(name: str) -> bool:
    """A POSIX account name (``beau``, ``nix-ssh``), as ``useradd`` takes it."""
    return ACCOUNT_NAME.fullmatch(name) is not None


def is_ipv6(address: str) -> bool:
    """An IPv6 address, bare or in brackets: ``is_ipv6("[fe80::1]")``."""
    bare = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        return False
    return True


def address_problem(address: str) -> str | None:
    """
    What is wrong with ``address`` as an SSH host address, or None: it must be a DNS name or
    an IPv4 address (an IPv6 address passes here; where nixpush needs it in a store URL, the
    fleet check refuses it with its own reason).
    """
    if is_ipv6(address):
        return None
    if _NUMERIC.fullmatch(address):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            return "is not an IPv4 address"
        return None
    if len(address) > _MAX_DNS_NAME or DNS_NAME.fullmatch(address) is None:
        return "is not a DNS name or an IPv4 address"
    return None


def is_one_line(text: str) -> bool:
    """No line break nor NUL: ``is_one_line("/srv/images/")``, not ``"/srv\\n/x"``."""
    return not any(c in text for c in _LINE_BREAKS)


def is_host_key(line: str) -> bool:
    """An SSH public key line ``TYPE BASE64 [comment]`` on one line, whose blob names its type:
    ``is_host_key("ssh-ed25519 AAAAC3Nz...")``."""
    # The blob starts with its own type as a length-prefixed string: "ssh-ed25519 AAAAC3Nz...".
    fields = line.split()
    if len(fields) < 2 or not _KEY_TYPE.fullmatch(fields[0]):
        return False
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    size = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + size] == fields[0].encode() and is_one_line(line)
