"""
Who can read a sops file: every master key its data key is encrypted to (age, PGP, KMS, ...,
in ``key_groups`` too), the age recipient each host's SSH host key gives it (sops-nix decrypts
a host's secrets with a key derived from its ed25519 host key), and the age keys the
controller itself decrypts with.

nixpush's own keys (the builder's push and signing keys) open passwordless root on every host
the builder pushes to, and sops encrypts a whole file with one data key: whoever holds any of
the file's master keys can read them. ``unexpected_readers`` names every master key but the
controller's age keys and an explicit allow-list (never a host's); ``pushed_readers`` the hosts
whose key is among them.

.. code:: python

    ssh_to_age("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF/KPU3Z5LSjbBI6hrq25wCcseq2UpqSzUFZRr+ux6LM")
    # "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp"
    file_recipients("secrets.yaml")   # ["age1...", ...]
    readers = unexpected_readers(
        sops_recipients(text), controller_age_recipients(os.environ, Path.home()),
        allowed=["age1backup..."], host_keys={"pi4": "ssh-ed25519 AAAA..."},
    )
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Curve25519's field: p = 2^255 - 19.
_P = 2**255 - 19
_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_ED25519 = "ssh-ed25519"
_AGE_SECRET_HRP = "age-secret-key-"  # noqa: S105  # the prefix, not a key
# What names a master key in sops's metadata, per kind (sops's own key IDs for Azure and Vault).
_KEY_NAMES: dict[str, tuple[str, ...]] = {
    "age": ("recipient",),
    "pgp": ("fp",),
    "kms": ("arn",),
    "gcp_kms": ("resource_id",),
    "azure_kv": ("vault_url", "name", "version"),
    "hc_vault": ("vault_address", "engine_path", "key_name"),
}
# A master key's fields that do not name it.
_KEY_DETAILS = frozenset({"enc", "created_at", "role", "context", "aws_profile"})
# dotenv and INI files keep the metadata flattened: `sops_age__list_0__map_recipient=age1...`,
# `sops_key_groups__list_0__map_pgp__list_1__map_fp=...` (INI: the same, unprefixed, under
# [sops]).
_FLAT_KEY = re.compile(
    r"^\s*(?:sops_)?(?P<entry>(?:[\w]*__map_)?(?P<kind>[a-z][a-z0-9_]*?)__list_\d+)"
    r"__map_(?P<field>[a-z_]+)\s*[=:]\s*(?P<value>.*?)\s*$"
)


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
    The age recipients a sops file is encrypted to, from its metadata (``sops_recipients``'s
    age keys, in key groups too). Raises OSError when it cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    return [r.name for r in sops_recipients(text) if r.kind == "age"]


def _document(text: str) -> Any:
    # sops writes JSON indented with tabs, which YAML does not allow: JSON first.
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


@dataclass(frozen=True)
class Recipient:
    """One master key a sops file's data key is encrypted to: its kind (``age``, ``pgp``,
    ``kms``, ...) and what names it (the age recipient, the PGP fingerprint, the ARN, ...)."""

    kind: str
    name: str


@dataclass(frozen=True)
class Reader:
    """A master key that can decrypt the file besides the controller's and the allowed ones;
    ``host``: the inventory host whose SSH host key gives it (sops-nix's), if one does."""

    recipient: Recipient
    host: str | None = None


def _recipient(kind: str, fields: Mapping[str, Any]) -> Recipient:
    named = [str(fields[f]).strip() for f in _KEY_NAMES.get(kind, ()) if fields.get(f)]
    if kind == "azure_kv" and len(named) == 3:
        return Recipient(kind, f"{named[0]}/keys/{named[1]}/{named[2]}")
    if kind == "hc_vault" and len(named) == 3:
        return Recipient(kind, f"{named[0]}/v1/{named[1]}/keys/{named[2]}")
    if len(named) == 1:
        return Recipient(kind, named[0])
    # A kind nixpush does not know (or a key with no name): still a reader, named by its fields.
    rest = {k: str(v) for k, v in fields.items() if k not in _KEY_DETAILS}
    return Recipient(kind, json.dumps(rest, sort_keys=True))


def _master_keys(kind: str, entries: Any) -> list[Recipient]:
    if not isinstance(entries, list):
        return []
    return [_recipient(kind, entry) for entry in entries if isinstance(entry, Mapping)]


def sops_recipients(text: str) -> list[Recipient]:
    """
    Every master key in a sops file's metadata (``text``: the file), in order: each list of
    keys in ``sops`` (``age``, ``pgp``, ``kms``, ``gcp_kms``, ``azure_kv``, ``hc_vault``, and
    any other list of keys) and each one of every ``key_groups`` group (Shamir's shares: each
    key holds a share, so each is a reader). YAML and JSON files, and the flattened metadata of
    dotenv and INI files.
    """
    document = _document(text)
    if isinstance(document, Mapping) and isinstance(document.get("sops"), Mapping):
        found: list[Recipient] = []
        for kind, entries in document["sops"].items():
            if kind == "key_groups" and isinstance(entries, list):
                for group in entries:
                    if isinstance(group, Mapping):
                        for inner, keys in group.items():
                            found += _master_keys(str(inner), keys)
            else:
                found += _master_keys(str(kind), entries)
        return found
    flat: dict[str, tuple[str, dict[str, str]]] = {}
    for line in text.splitlines():
        match = _FLAT_KEY.match(line)
        if match is not None:
            kind, fields = flat.setdefault(match["entry"], (match["kind"], {}))
            fields[match["field"]] = match["value"]
    return [_recipient(kind, fields) for kind, fields in flat.values()]


def bech32_decode(text: str) -> tuple[str, bytes] | None:
    """``(hrp, data)`` of a Bech32 string (either case, checksum verified), or None."""
    text = text.strip()
    if text != text.lower() and text != text.upper():
        return None
    text = text.lower()
    hrp, separator, rest = text.rpartition("1")
    if not separator or not hrp or len(rest) < 6 or any(c not in _BECH32_CHARSET for c in rest):
        return None
    words = [_BECH32_CHARSET.index(c) for c in rest]
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    if _polymod([*expanded, *words]) != 1:
        return None
    accumulator, bits, data = 0, 0, bytearray()
    for word in words[:-6]:  # 5-bit words to bytes; the padding bits must be zero
        accumulator = accumulator << 5 | word
        bits += 5
        if bits >= 8:
            bits -= 8
            data.append(accumulator >> bits & 255)
    if bits >= 5 or accumulator & ((1 << bits) - 1):
        return None
    return hrp, bytes(data)


def x25519_public(scalar: bytes) -> bytes:
    """X25519(scalar, 9): the public key of a 32-byte secret (RFC 7748's ladder)."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    n = int.from_bytes(k, "little")
    x2, z2, x3, z3, swap = 1, 0, 9, 1, 0
    for t in reversed(range(255)):
        bit = n >> t & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        aa, bb, da, cb = a * a % _P, b * b % _P, d * a % _P, c * b % _P
        e = (aa - bb) % _P
        x3, z3 = (da + cb) ** 2 % _P, 9 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def age_identity_recipient(identity: str) -> str | None:
    """The recipient (``age1...``) of an age identity line (``AGE-SECRET-KEY-1...``), as
    ``age-keygen -y`` prints it; None for anything else (plugin identities, comments)."""
    decoded = bech32_decode(identity)
    if decoded is None or decoded[0] != _AGE_SECRET_HRP or len(decoded[1]) != 32:
        return None
    return bech32_encode("age", x25519_public(decoded[1]))


def controller_age_recipients(environ: Mapping[str, str], home: Path) -> list[str]:
    """
    The recipients of the age identities sops on this controller decrypts with: those in
    ``SOPS_AGE_KEY``, in ``SOPS_AGE_KEY_FILE``'s file and in sops's default key file
    (``$XDG_CONFIG_HOME/sops/age/keys.txt``, else ``~/.config/sops/age/keys.txt``). A file
    that cannot be read gives none. Only the public halves leave this function.
    """
    return identities_recipients(controller_age_identities(environ, home))


def controller_age_identities(environ: Mapping[str, str], home: Path) -> list[str]:
    """The texts ``controller_age_recipients`` reads its identities from (secret: keep them
    in memory only)."""
    texts = [environ.get("SOPS_AGE_KEY", "")]
    config = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    for path in (environ.get("SOPS_AGE_KEY_FILE"), os.path.join(config, "sops/age/keys.txt")):
        if path:
            try:
                texts.append(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass
    return texts


def identities_recipients(texts: Sequence[str]) -> list[str]:
    """The recipients of the age identities in ``texts`` (one per line, ``#`` comments)."""
    found: list[str] = []
    for text in texts:
        for line in text.splitlines():
            recipient = age_identity_recipient(line) if not line.startswith("#") else None
            if recipient is not None and recipient not in found:
                found.append(recipient)
    return found


def _same(a: str, b: str) -> bool:
    # PGP fingerprints are written in either case, sometimes in groups.
    return "".join(a.split()).casefold() == "".join(b.split()).casefold()


def unexpected_readers(
    recipients: Sequence[Recipient],
    controller: Collection[str],
    allowed: Collection[str],
    host_keys: Mapping[str, str | None],
) -> list[Reader]:
    """
    Every master key of ``recipients`` that can decrypt the file besides the controller's age
    keys (``controller``) and the ``allowed`` ones, each with the host (of ``host_keys``: name
    -> ``ssh_host_key``) whose SSH host key gives it. A host's key is a reader even when the
    controller or the allow-list holds it too: nixpush's keys must never reach a host.
    """
    hosts = {ssh_to_age(key): name for name, key in host_keys.items() if key is not None}
    hosts.pop(None, None)
    readers: list[Reader] = []
    for recipient in recipients:
        host = hosts.get(recipient.name) if recipient.kind == "age" else None
        exempt = (recipient.kind == "age" and recipient.name in controller) or any(
            _same(recipient.name, name) for name in allowed
        )
        if (host is not None or not exempt) and Reader(recipient, host) not in readers:
            readers.append(Reader(recipient, host))
    return readers


def pushed_readers(recipients: Sequence[str], host_keys: Mapping[str, str | None]) -> list[str]:
    """The hosts (of ``host_keys``: name -> ``ssh_host_key``) whose host key's age recipient is
    among ``recipients``: ``["pi4"]`` when a file is encrypted to pi4's sops-nix key."""
    wanted = {recipient.strip() for recipient in recipients}
    return [
        name for name, key in host_keys.items() if key is not None and ssh_to_age(key) in wanted
    ]
