"""The bench's pure parts the end-to-end tests lean on: when the push preparation runs again,
and what the leak tests look for (the lines of a bench secret that hold secret material)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.bench import client, fleet
from tests.bench.sops import secret_lines


def test_push_preparation_runs_again_only_when_hosts_changed_or_started_again(monkeypatch):
    pids = {h.name: 100 + i for i, h in enumerate(fleet.HOSTS)}
    monkeypatch.setattr(fleet, "init_pid", lambda h: pids.get(h.name))
    runs: list[None] = []
    monkeypatch.setattr(client, "prepare_push", lambda: runs.append(None))
    preparation = client.PushPreparation()

    preparation.ensure()
    preparation.ensure()
    assert len(runs) == 1  # the same hosts, still running: nothing to do

    pids[fleet.HOSTS[1].name] += 1000  # a host started again (down and up, say)
    preparation.ensure()
    preparation.ensure()
    assert len(runs) == 2

    more = (*fleet.HOSTS, replace(fleet.HOSTS[1], name="pi9"))  # up --pis: another fleet
    monkeypatch.setattr(fleet, "HOSTS", more)
    preparation.ensure()
    assert len(runs) == 3


def test_testinfra_checks_share_one_connection_per_host_of_this_bench():
    pi = next(h for h in fleet.HOSTS if h.user != "root")

    command, args = client.on_host(pi.name).backend._build_ssh_command("true")

    line = " ".join(command) % tuple(args)
    assert f"-o ControlPath={pi.ssh_control} " in line and "ControlMaster=auto" in line
    assert pi.ssh_control.is_relative_to(fleet.BENCH_DIR)  # one per bench instance
    assert len({h.ssh_control for h in fleet.HOSTS}) == len(fleet.HOSTS)


def test_a_killed_process_not_yet_reaped_counts_as_exited():
    # The background sleep's parent becomes the exec'd sleep, which never reaps it.
    parent = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; exec sleep 60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{parent.pid}/comm").read_text() != "sleep\n":  # sh, until its exec
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not fleet._exited(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not fleet._exited(pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert Path(f"/proc/{pid}").exists()  # a zombie, not gone
    finally:
        parent.kill()
        parent.wait()


def openssh_key() -> tuple[str, bytes]:
    """A new unencrypted OpenSSH ed25519 private key, as the bench makes them, and its seed."""
    key = Ed25519PrivateKey.generate()
    text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return text, seed


def test_no_secret_line_of_a_key_is_found_in_another_key_of_its_kind():
    first, _ = openssh_key()
    second, _ = openssh_key()
    # The first body line (magic, cipher "none", KDF "none", one key, its type) is every
    # such key's: a leak test comparing it flags any OpenSSH key lying in /tmp.
    assert first.splitlines()[1] == second.splitlines()[1]

    for number, line in secret_lines(first):
        assert line not in second, number


def test_secret_lines_skip_armour_and_the_public_header_and_keep_every_private_byte():
    text, seed = openssh_key()
    lines = text.splitlines()

    found = secret_lines(text)

    numbers = [number for number, _ in found]
    assert all(line == lines[number] for number, line in found)
    assert 0 not in numbers and len(lines) - 1 not in numbers  # BEGIN and END armour
    assert 1 not in numbers  # the header shared by every key of its kind
    # From the first line that holds a byte past the public key, every line to the end:
    # whatever holds the private key is looked for.
    assert numbers == list(range(numbers[0], len(lines) - 1))
    body = "".join(lines[1:-1])
    kept = "".join(lines[numbers[0] : -1])
    seed_at = base64.b64decode(body).index(seed)
    assert len(body) - len(kept) <= seed_at * 4 // 3  # the seed's characters are all kept


def test_a_value_without_pem_keeps_every_long_enough_line():
    nix_key = "nixpush-bench-1:" + base64.b64encode(bytes(range(64))).decode()

    assert secret_lines(nix_key) == [(0, nix_key)]
    assert secret_lines("first line is long enough\nshort\n") == [(0, "first line is long enough")]
