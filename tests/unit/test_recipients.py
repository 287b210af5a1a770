"""ssh-to-age's mapping (SSH ed25519 host key -> the age recipient sops-nix decrypts with), a
sops file's recipients, and the refusal of a push-key file a pushed host could decrypt."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from operations.core.runstate import current_run
from operations.data.fleet import host_secrets, read_fleet
from operations.trust import secrets
from operations.trust.recipients import bech32_encode, file_recipients, pushed_readers, ssh_to_age
from operations.trust.secrets import SecretError, decrypt_secret
from operations.trust.sops import Plaintext

# Mic92/ssh-to-age's test vectors: cmd/ssh-to-age/test-assets/keyscan.txt's ed25519 keys and
# the recipients its README prints for them (`ssh-keyscan eve.thalheim.io eva.thalheim.io |
# ssh-to-age`).
VECTORS = {
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF/KPU3Z5LSjbBI6hrq25wCcseq2UpqSzUFZRr+ux6LM":
        "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIL2vjdqpppuCn7yPdF2muINriAG7zBWrsELKpPWkhn5":
        "age1v8zjc47jmlqwefyu66s0d4ke98qr4vnuj3cpvs4z9npfdw833dxqwjrhzv",
}  # fmt: skip


@pytest.mark.parametrize(("host_key", "recipient"), VECTORS.items())
def test_ssh_to_age_matches_its_reference_vectors(host_key, recipient):
    assert ssh_to_age(f"{host_key} root@eve") == recipient


def test_only_ed25519_keys_have_an_age_recipient():
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDH"
    assert ssh_to_age(rsa) is None
    assert ssh_to_age("ssh-ed25519 not-base64!") is None
    assert ssh_to_age("") is None


def _ssh_public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    blob = b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + raw
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}"


def test_the_recipient_is_the_public_half_of_the_key_sops_nix_derives_from_the_host_key():
    # sops-nix (ssh-to-age -private-key) decrypts with X25519 scalar sha512(seed)[:32]: its
    # public key is the recipient we derive from the host's public key alone.
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    scalar = hashlib.sha512(seed).digest()[:32]
    x25519 = X25519PrivateKey.from_private_bytes(scalar).public_key()
    expected = bech32_encode(
        "age", x25519.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert ssh_to_age(_ssh_public(key)) == expected
    keygen = shutil.which("age-keygen")
    if keygen:  # age itself agrees: the identity's recipient is the same string
        identity = bech32_encode("age-secret-key-", scalar).upper()
        shown = subprocess.run([keygen, "-y"], input=identity, capture_output=True, text=True)
        assert shown.stdout.strip() == expected, shown.stderr


SOPS_YAML = """\
ssh:
    nas_deploy: ENC[AES256_GCM,data:abc,iv:def,tag:ghi,type:str]
sops:
    age:
        - recipient: {owner}
          enc: |
            -----BEGIN AGE ENCRYPTED FILE-----
            -----END AGE ENCRYPTED FILE-----
        - recipient: {host}
          enc: |
            -----BEGIN AGE ENCRYPTED FILE-----
            -----END AGE ENCRYPTED FILE-----
    version: 3.11.0
"""
OWNER = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
PI4_KEY = next(iter(VECTORS))


def test_a_sops_files_recipients_come_from_its_metadata(tmp_path: Path):
    path = tmp_path / "secrets.yaml"
    path.write_text(SOPS_YAML.format(owner=OWNER, host=VECTORS[PI4_KEY]))
    assert file_recipients(path) == [OWNER, VECTORS[PI4_KEY]]
    dotenv = tmp_path / "secrets.env"
    dotenv.write_text(f"A=ENC[...]\nsops_age__list_0__map_recipient={OWNER}\n")
    assert file_recipients(dotenv) == [OWNER]
    assert pushed_readers([OWNER, VECTORS[PI4_KEY]], {"pi4": PI4_KEY, "pi5": None}) == ["pi4"]


def _fleet_of(host):  # type: ignore[no-untyped-def]
    """The host's spec and its fleet's, as deploy code has them."""
    specs = read_fleet(host.inventory)[0]
    return specs[host.name], specs


def _builder(write_inventory, tmp_path: Path, recipients: str, own: Path | None = None):
    shared = tmp_path / "secrets.yaml"
    shared.write_text(SOPS_YAML.format(owner=OWNER, host=recipients))
    data = {"nix_system": "x86_64-linux", "sops_file": str(shared)}
    if own is not None:
        data["nixpush_sops_file"] = str(own)
    pi4 = {
        "nix_system": "aarch64-linux",
        "builder_host": "nas",
        "ssh_hostname": "192.168.1.122",
        "ssh_host_key": PI4_KEY,
    }
    entry = {"key": "ssh/nas_deploy", "dest": secrets.DEPLOY_KEY_PATH}
    inventory = write_inventory(
        {"server": [("nas", data)], "network": [("pi4", pi4)]},
        group_data={"server": f"secrets = [{entry!r}]"},
    )
    host = inventory.get_host("nas")
    (secret,) = host_secrets(host)
    return host, secret, shared


def test_a_push_key_in_a_file_a_pushed_host_can_decrypt_is_refused_naming_the_fix(
    write_inventory, tmp_path, monkeypatch
):
    monkeypatch.setattr(secrets, "decrypt", lambda f, k, **_: Plaintext("ssh/nas_deploy", "x"))
    host, secret, shared = _builder(write_inventory, tmp_path, VECTORS[PI4_KEY])
    with pytest.raises(SecretError) as caught:
        decrypt_secret(*_fleet_of(host), secret)
    message = caught.value.message
    assert message.startswith(f"nas: secret ssh/nas_deploy ({secrets.DEPLOY_KEY_PATH}): {shared}")
    assert "age key of pi4's SSH host key" in message
    assert "set nixpush_sops_file to it" in message and f"remove them from {shared}" in message


def test_the_push_key_comes_from_nixpushs_own_file_when_set(write_inventory, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        secrets, "decrypt", lambda f, k, **_: calls.append(f) or Plaintext("k", "x")
    )
    own = tmp_path / "nixpush.yaml"
    own.write_text(SOPS_YAML.format(owner=OWNER, host=OWNER))
    # The shared file is encrypted to pi4 (sops-nix's), nixpush's own file only to the owner.
    host, secret, _ = _builder(write_inventory, tmp_path, VECTORS[PI4_KEY], own=own)
    decrypt_secret(*_fleet_of(host), secret)
    assert calls == [str(own)]
    current_run().drop_secrets()
