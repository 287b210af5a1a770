"""ssh-to-age's mapping (SSH ed25519 host key -> the age recipient sops-nix decrypts with), a
sops file's recipients (every kind, key groups too), the controller's own age keys, and the
refusal of a push-key file anyone else could decrypt."""

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
from operations.data.fleet import check_fleet, host_secrets, read_fleet
from operations.trust import secrets, sops
from operations.trust.recipients import (
    Reader,
    Recipient,
    age_identity_recipient,
    bech32_decode,
    bech32_encode,
    controller_age_recipients,
    file_recipients,
    pushed_readers,
    sops_recipients,
    ssh_to_age,
    unexpected_readers,
    x25519_public,
)
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
# The controller's age identity in these tests (SOPS_AGE_KEY): the owner's key.
OWNER_IDENTITY = bech32_encode("age-secret-key-", bytes(range(32))).upper()
OWNER = age_identity_recipient(OWNER_IDENTITY) or ""
BACKUP = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
PI4_KEY = next(iter(VECTORS))


@pytest.fixture(autouse=True)
def controller_key(monkeypatch, tmp_path):
    """The controller decrypts with the owner's key, and with nothing else on this machine."""
    monkeypatch.setenv("SOPS_AGE_KEY", OWNER_IDENTITY)
    monkeypatch.delenv("SOPS_AGE_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


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


def _builder(
    write_inventory, tmp_path: Path, recipients: str, own: Path | None = None,
    pi4_data: dict | None = None, nas_data: dict | None = None, text: str | None = None,
    filename: str = "inventory.py",
):  # fmt: skip
    shared = tmp_path / "secrets.yaml"
    shared.write_text(text or SOPS_YAML.format(owner=OWNER, host=recipients))
    data = {"nix_system": "x86_64-linux", "sops_file": str(shared), **(nas_data or {})}
    if own is not None:
        data["nixpush_sops_file"] = str(own)
    pi4 = {
        "nix_system": "aarch64-linux",
        "builder_host": "nas",
        "ssh_hostname": "192.168.1.122",
        "ssh_host_key": PI4_KEY,
        **(pi4_data or {}),
    }
    entry = {"key": "ssh/nas_deploy", "dest": secrets.DEPLOY_KEY_PATH}
    inventory = write_inventory(
        {"server": [("nas", data)], "network": [("pi4", {k: v for k, v in pi4.items() if v})]},
        group_data={"server": f"secrets = [{entry!r}]"},
        filename=filename,
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


def test_an_age_identity_gives_the_recipient_age_keygen_prints():
    scalar = hashlib.sha256(b"nixpush").digest()
    public = X25519PrivateKey.from_private_bytes(scalar).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert x25519_public(scalar) == raw
    identity = bech32_encode("age-secret-key-", scalar).upper()
    assert age_identity_recipient(identity) == bech32_encode("age", raw)
    assert bech32_decode(identity) == ("age-secret-key-", scalar)
    assert bech32_decode(identity[:-1] + ("Q" if identity[-1] != "Q" else "P")) is None
    assert age_identity_recipient("AGE-PLUGIN-YUBIKEY-1QQQ") is None
    assert age_identity_recipient("# created: 2024") is None
    keygen = shutil.which("age-keygen")
    if keygen:
        shown = subprocess.run([keygen, "-y"], input=identity, capture_output=True, text=True)
        assert shown.stdout.strip() == age_identity_recipient(identity), shown.stderr


def test_the_controllers_age_keys_come_from_where_sops_reads_them(tmp_path: Path):
    keys = [bech32_encode("age-secret-key-", bytes([n]) * 32).upper() for n in (1, 2, 3)]
    public = [age_identity_recipient(key) for key in keys]
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"# created: now\n# public key: {public[1]}\n{keys[1]}\n")
    default = tmp_path / ".config" / "sops" / "age" / "keys.txt"
    default.parent.mkdir(parents=True)
    default.write_text(keys[2] + "\n")
    env = {"SOPS_AGE_KEY": keys[0], "SOPS_AGE_KEY_FILE": str(key_file)}
    assert controller_age_recipients(env, tmp_path) == public  # ~/.config by default
    env = {"SOPS_AGE_KEY_FILE": str(tmp_path / "gone.txt"), "XDG_CONFIG_HOME": str(key_file)}
    assert controller_age_recipients(env, tmp_path) == []


PGP = "FBC7B9E2A4F9289AC0C1D4843D16CEE4A27381B4"
ARN = "arn:aws:kms:us-east-1:656532927350:key/920aff2e-c5f1-4040-943a-047fa387b27e"


def test_every_master_key_of_a_sops_file_is_a_recipient_key_groups_too():
    text = f"""\
a: ENC[AES256_GCM,data:abc,type:str]
sops:
    kms:
        - arn: {ARN}
          enc: x
    pgp:
        - fp: {PGP}
          enc: x
    hc_vault:
        - vault_address: http://127.0.0.1:8200
          engine_path: sops
          key_name: backup
          enc: x
    key_groups:
        - age:
            - recipient: {OWNER}
              enc: x
          hc_vault: []
        - age:
            - recipient: {BACKUP}
              enc: x
    shamir_threshold: 2
"""
    assert sops_recipients(text) == [
        Recipient("kms", ARN),
        Recipient("pgp", PGP),
        Recipient("hc_vault", "http://127.0.0.1:8200/v1/sops/keys/backup"),
        Recipient("age", OWNER),
        Recipient("age", BACKUP),
    ]
    flat = f"A=ENC[...]\nsops_key_groups__list_1__map_age__list_0__map_recipient={BACKUP}\n"
    flat += f"sops_pgp__list_0__map_fp={PGP}\nsops_pgp__list_0__map_enc=x\n"
    assert sops_recipients(flat) == [Recipient("age", BACKUP), Recipient("pgp", PGP)]


@pytest.mark.skipif(shutil.which("sops") is None and sops.find_program("sops") is None,
                    reason="needs sops")  # fmt: skip
@pytest.mark.parametrize(
    ("name", "plain"),
    [("x.yaml", "a: 1\n"), ("x.env", "A=1\n"), ("x.ini", "[s]\na = 1\n"), ("x.json", '{"a": 1}')],
)
def test_a_real_sops_files_key_groups_are_read_in_every_format(tmp_path: Path, name, plain):
    (tmp_path / ".sops.yaml").write_text(
        f"creation_rules:\n  - shamir_threshold: 2\n    key_groups:\n"
        f"      - age: ['{OWNER}']\n      - age: ['{BACKUP}']\n"
    )
    (tmp_path / name).write_text(plain)
    program = sops.find_program("sops") or "sops"
    encrypted = subprocess.run(
        [program, "--disable-version-check", "-e", name], cwd=tmp_path,
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = sops_recipients(encrypted)
    assert sorted(found, key=lambda r: r.name) == sorted(
        [Recipient("age", OWNER), Recipient("age", BACKUP)], key=lambda r: r.name
    )


def test_every_reader_but_the_controllers_key_and_the_allowed_ones_is_named():
    recipients = [Recipient("age", OWNER), Recipient("age", BACKUP), Recipient("pgp", PGP)]
    hosts = {"pi4": PI4_KEY, "pi5": None, "rsa": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDH"}
    assert unexpected_readers(recipients, [OWNER], [], hosts) == [
        Reader(Recipient("age", BACKUP)), Reader(Recipient("pgp", PGP)),
    ]  # fmt: skip
    # The allow-list (a PGP fingerprint in any case, in groups); nothing left.
    grouped = " ".join(PGP[i : i + 4] for i in range(0, 40, 4)).lower()
    assert unexpected_readers(recipients, [OWNER], [BACKUP, grouped], hosts) == []
    # With no controller key, the owner's is a reader too.
    assert Reader(Recipient("age", OWNER)) in unexpected_readers(recipients, [], [], hosts)
    # A host's key is named after it, and neither the controller nor the allow-list excuses it.
    pi4 = Recipient("age", VECTORS[PI4_KEY])
    assert unexpected_readers([pi4], [pi4.name], [pi4.name], hosts) == [Reader(pi4, "pi4")]


def _refusal(host, secret) -> str:
    with pytest.raises(SecretError) as caught:
        decrypt_secret(*_fleet_of(host), secret)
    return caught.value.message


@pytest.mark.parametrize(
    "case", ["rsa-pinned pi4", "pi4 built elsewhere", "pi4 without ssh_host_key", "key groups"]
)
def test_a_push_key_file_any_other_key_can_read_is_refused(
    write_inventory, tmp_path, monkeypatch, case
):
    """What the host-by-host check missed: the file is encrypted to a key beside the owner's
    that no pushed host's ed25519 key gives."""
    monkeypatch.setattr(secrets, "decrypt", lambda f, k, **_: Plaintext("ssh/nas_deploy", "x"))
    pi4: dict = {
        "rsa-pinned pi4": {"ssh_host_key": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDH"},
        "pi4 built elsewhere": {"builder_host": "pi4", "ssh_host_key": PI4_KEY},
        "pi4 without ssh_host_key": {"ssh_host_key": None},
        "key groups": {},
    }[case]
    text = None
    if case == "key groups":
        text = (
            f"a: ENC[x]\nsops:\n    key_groups:\n        - age:\n            - recipient: {OWNER}\n"
            f"        - pgp:\n            - fp: {PGP}\n    shamir_threshold: 2\n"
        )
    host, secret, shared = _builder(write_inventory, tmp_path, BACKUP, pi4_data=pi4, text=text)
    message = _refusal(host, secret)
    named = f"PGP key {PGP}" if case == "key groups" else f"age key {BACKUP}"
    assert f"{shared} is also encrypted to {named}, besides the controller's age key" in message
    assert (
        "so whoever holds it could decrypt the key that opens every host nas pushes to" in message
    )
    assert "goes in nas's nixpush_sops_recipients" in message
    current_run().drop_secrets()


def test_an_allowed_backup_key_is_accepted_and_a_host_key_never(
    write_inventory, tmp_path, monkeypatch
):
    calls: list[str] = []
    monkeypatch.setattr(
        secrets, "decrypt", lambda f, k, **_: calls.append(f) or Plaintext("k", "x")
    )
    allow = {"nixpush_sops_recipients": [BACKUP]}
    host, secret, shared = _builder(write_inventory, tmp_path, BACKUP, nas_data=allow)
    decrypt_secret(*_fleet_of(host), secret)
    assert calls == [str(shared)]
    # The same list naming pi4's key does not let pi4 read it.
    allow = {"nixpush_sops_recipients": [BACKUP, VECTORS[PI4_KEY]]}
    host, secret, _ = _builder(write_inventory, tmp_path, VECTORS[PI4_KEY], nas_data=allow)
    assert "the age key of pi4's SSH host key (sops-nix's)" in _refusal(host, secret)
    current_run().drop_secrets()


def test_a_bad_allow_list_stops_the_run_naming_the_key(write_inventory, tmp_path):
    from operations.data.fleet import FleetError

    for n, value in enumerate((BACKUP, [""], ["age1x\ny"], [3])):
        data = {"nixpush_sops_recipients": value}
        host, _, _ = _builder(write_inventory, tmp_path, OWNER, nas_data=data, filename=f"{n}.py")
        with pytest.raises(FleetError) as caught:
            check_fleet(host.inventory)
        assert any(
            p.startswith(f"nas: nixpush_sops_recipients is {value!r}; set it to a list of")
            for p in caught.value.problems
        ), (n, caught.value.problems)


def test_a_push_key_file_that_passed_is_not_parsed_again_in_the_run(
    write_inventory, tmp_path, monkeypatch
):
    """Every target of a builder decrypts its keys: the file's metadata is parsed once a run,
    and again only when something the check read changed (here, the file)."""
    monkeypatch.setattr(secrets, "decrypt", lambda f, k, **_: Plaintext("k", "x"))
    parsed: list[str] = []
    parse = secrets.sops_recipients
    monkeypatch.setattr(secrets, "sops_recipients", lambda text: parsed.append(text) or parse(text))
    allow = {"nixpush_sops_recipients": [BACKUP]}
    host, secret, shared = _builder(write_inventory, tmp_path, BACKUP, nas_data=allow)
    for _ in range(3):
        decrypt_secret(*_fleet_of(host), secret)
    assert len(parsed) == 1
    shared.write_text(shared.read_text() + "\n")
    decrypt_secret(*_fleet_of(host), secret)
    assert len(parsed) == 2
    current_run().drop_secrets()
