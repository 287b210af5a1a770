"""
Who can read a sops file: its age recipients, and the age recipient each host's SSH host key
gives it (sops-nix decrypts a host's secrets with a key derived from its ed25519 host key).

nixpush's own keys (the builder's push and signing keys) open passwordless root on every host
the builder pushes to, and sops encrypts a whole file with one data key: a file holding them
must not be readable by any of those hosts. ``pushed_readers`` names the hosts that could.

.. code:: python

    ssh_to_age("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF/KPU3Z5LSjbBI6hrq25wCcseq2UpqSzUFZRr+ux6LM")
    # "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp"
    file_recipients("secrets.yaml")   # ["age1...", ...]
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Curve25519's field: p = 2^255 - 19.
_P = 2**255 - 19
_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_AGE_RECIPIENT = re.compile(r"age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}")
_ED25519 = "ssh-ed25519"


def _polymod(values: Iterable[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(_BECH32_GENERATOR):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum


def bech32_encode(hrp: str, data: bytes) -> str:
    """Bech32 (BIP 173, the original checksum, as age uses) of ``data`` under ``hrp``."""
    words: list[int] = []
    accumulator, bits = 0, 0
    for byte in data:  # 8-bit bytes to 5-bit words, the last one padded with zeros
        accumulator = accumulator << 8 | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            words.append(accumulator >> bits & 31)
    if bits:
        words.append(accumulator << (5 - bits) & 31)
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    checksum = _polymod([*expanded, *words, 0, 0, 0, 0, 0, 0]) ^ 1
    words += [checksum >> 5 * (5 - i) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32_CHARSET[word] for word in words)


def ed25519_to_x25519(public_key: bytes) -> bytes:
    """The X25519 (Montgomery u) public key of an Ed25519 public key (RFC 7748's birational
    map, u = (1 + y) / (1 - y)), as age and ssh-to-age derive it. ValueError when invalid."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if y >= _P or (1 - y) % _P == 0:
        raise ValueError("not an Ed25519 public key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def ssh_to_age(host_key: str) -> str | None:
    """
    The age recipient (``age1...``) of an SSH ``ssh-ed25519`` public key line, as
    ``ssh-to-age`` prints it and sops-nix decrypts with; None for other key types (sops-nix
    derives age keys from ed25519 host keys only) and lines that are not a key.
    """
    fields = host_key.split()
    if len(fields) < 2 or fields[0] != _ED25519:
        return None
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    # The blob: a length-prefixed "ssh-ed25519", then the length-prefixed 32-byte key.
    name_size = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + name_size] != _ED25519.encode():
        return None
    key = blob[4 + name_size + 4 :]
    try:
        return bech32_encode("age", ed25519_to_x25519(key))
    except ValueError:
        return None


def file_recipients(path: str | Path) -> list[str]:
    """
    The age recipients a sops file is encrypted to, from its metadata (``sops.age[].recipient``
    in a YAML or JSON file; the ``age1...`` values of the metadata lines otherwise). Raises
    OSError when it cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError:
        document = None
    if isinstance(document, Mapping) and isinstance(document.get("sops"), Mapping):
        entries = document["sops"].get("age") or []
        return [
            str(entry["recipient"]).strip()
            for entry in entries
            if isinstance(entry, Mapping) and entry.get("recipient")
        ]
    # dotenv and INI files keep the metadata as `sops_age__list_0__map_recipient=age1...`.
    return [
        match.group(0)
        for line in text.splitlines()
        if line.startswith("sops_age") or "recipient" in line
        for match in _AGE_RECIPIENT.finditer(line)
    ]


def pushed_readers(recipients: Sequence[str], host_keys: Mapping[str, str | None]) -> list[str]:
    """The hosts (of ``host_keys``: name -> ``ssh_host_key``) whose host key's age recipient is
    among ``recipients``: ``["pi4"]`` when a file is encrypted to pi4's sops-nix key."""
    wanted = {recipient.strip() for recipient in recipients}
    return [
        name for name, key in host_keys.items() if key is not None and ssh_to_age(key) in wanted
    ]
