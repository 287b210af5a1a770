"""
Secrets from sops onto the bench: `pyinfra tests/bench/inventory.py deploys/secrets.py`, run as a
user would (``SOPS_AGE_KEY_FILE`` in its environment), then checked on the hosts.

The secrets file and age key are the bench's test-only ones (tests/bench/sops.py); the expected
files come from the inventory (``host_secrets``), so no host or path is hard-coded here.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from operations.data.fleet import host_secrets
from operations.trust import keys, ssh
from operations.trust.secrets import Secret
from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, on_host, pyinfra
from tests.bench.client import ssh as ssh_to
from tests.unit.conftest import REPO, load_inventory

DEPLOY = "deploys/secrets.py"
STARTED = time.time()


@pytest.fixture(scope="module")
def values(bench: None) -> dict[str, str]:
    """Every value in the bench's secrets file, decrypted in memory, by key path."""
    bench_sops.ensure()
    return {key: bench_sops.value(key) for key in bench_sops.keys()}


@pytest.fixture(scope="module")
def expected(bench: None) -> list[tuple[str, Secret]]:
    """(host, secret) for every secret the inventory gives every host."""
    inventory = load_inventory(REPO / BENCH_INVENTORY, REPO)
    return [(h.name, secret) for h in inventory for secret in host_secrets(h)]


def run_deploy(*args: str, env: dict[str, str] | None = None) -> str:
    result = pyinfra("-y", *args, BENCH_INVENTORY, DEPLOY, env=env or bench_sops.env(), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def leaked_forms(values: dict[str, str]) -> dict[str, str]:
    """What counts as a leak: each value, each line of it with secret material (no PEM armour,
    no key's public header), and its base64 (the stdin form)."""
    forms: dict[str, str] = {}
    for key, value in values.items():
        forms[f"{key} (whole)"] = value.strip()
        forms[f"{key} (base64)"] = base64.b64encode(value.encode()).decode()
        for number, line in bench_sops.secret_lines(value):
            forms[f"{key} (line {number})"] = line
    return forms


def assert_no_plaintext(text: str, values: dict[str, str], where: str) -> None:
    # Name the leak, never show it.
    leaks = [name for name, form in leaked_forms(values).items() if form in text]
    assert leaks == [], f"plaintext of {leaks} found in {where}"


def pending_change(host_name: str, dest: str, how: str = "chmod") -> None:
    """Put one secret file out of date on a host (Pi secrets only: the lead's pushes use nas')."""
    if how == "chmod":
        command = f"sudo chmod 0644 {dest}"
    elif how == "chown":
        command = f"sudo chown {fleet.host(host_name).user} {dest}"
    else:
        command = f"echo tampered | sudo tee {dest} >/dev/null"
    ssh_to(host_name, command)


def file_states(expected: list[tuple[str, Secret]]) -> dict[tuple[str, str], tuple[object, ...]]:
    states = {}
    for host_name, secret in expected:
        f = on_host(host_name).file(secret.dest)
        states[(host_name, secret.dest)] = (
            (f.sha256sum, f.mode, f.user, f.group) if f.exists else None,
        )
    return states


def grand_total(output: str) -> tuple[str, ...]:
    match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    assert match, output[-2000:]
    return match.groups()


@pytest.fixture
def pi_secret(expected: list[tuple[str, Secret]]) -> tuple[str, Secret]:
    """A Pi's secret this test may break: pi5's, nobody else's tests read it."""
    return next((h, s) for h, s in expected if h == "pi5")


@pytest.fixture
def converged(values: dict[str, str]) -> Iterator[None]:
    run_deploy()
    yield


# Installing, and never leaking


def test_deploy_installs_every_secret_at_vvv_without_printing_it(values, expected, pi_secret):
    host_name, secret = pi_secret
    assert len(leaked_forms(values)) >= 2 * len(values)  # the search has something to find
    ssh_to(host_name, f"sudo rm -f {secret.dest}")

    output = run_deploy("-vvv")

    assert ">>> sudo -H -n sh -c 'umask 077" in output  # the write ran and was printed
    assert_no_plaintext(output, values, "pyinfra -vvv output")
    for name, wanted in expected:
        f = on_host(name).file(wanted.dest)
        assert f.is_file, (name, wanted.dest)
        assert f.content_string == values[wanted.label], (name, wanted.dest)
        assert (f.mode, f.user, f.group) == (wanted.mode, wanted.owner, wanted.group)


def test_targets_trust_the_builders_keys(values, converged):
    deploy_private = values["ssh/nas_deploy"]
    signing = values["nix/nas_signing_key"]
    nas = on_host("nas")
    deploy_public = nas.file(f"{keys.DEPLOY_KEY_PATH}.pub").content_string.split()[:2]
    nix_public = nas.file("/root/.nixpush/signing-key.pub").content_string.strip()
    assert nix_public.split(":")[0] == signing.split(":")[0]
    assert deploy_public[0] == "ssh-ed25519" and deploy_private.startswith("-----BEGIN OPENSSH")
    for pi in fleet.PIS:
        h = on_host(pi.name)
        authorized = h.file(f"{pi.home}/.ssh/authorized_keys")
        assert " ".join(deploy_public) in authorized.content_string
        assert (authorized.user, authorized.mode) == (pi.user, 0o600)
        assert nix_public in h.file("/etc/nix/nix.conf").content_string


def test_nas_reaches_each_pi_with_the_deploy_key_verifying_its_host_key(converged):
    for pi in fleet.PIS:
        command = " ".join(
            ("ssh", *ssh.SSH_OPTIONS, "-o", "BatchMode=yes", "-p", str(pi.port),
             f"{pi.user}@{pi.ip}", "id", "-un")
        )  # fmt: skip
        assert ssh_to("nas", command).stdout.strip() == pi.user
        # The same without the host key on record is refused: the key really is verified.
        unknown = command.replace(ssh.BUILDER_KNOWN_HOSTS, "/dev/null")
        refused = ssh_to("nas", unknown, check=False)
        assert refused.returncode != 0
        assert "Host key verification failed" in refused.stderr


@pytest.mark.parametrize("flag", ["--debug", "--diff"])
def test_debug_and_diff_runs_do_not_print_plaintext(values, pi_secret, flag):
    host_name, secret = pi_secret
    pending_change(host_name, secret.dest, how="content")

    output = run_deploy(flag)

    assert_no_plaintext(output, values, f"pyinfra {flag} output")
    assert on_host(host_name).file(secret.dest).content_string == values[secret.label]


def test_controller_temp_dirs_hold_no_plaintext(values):
    # Everything written since this module started (the runs above), wherever temp files go.
    roots = {Path("/tmp"), Path(os.environ.get("TMPDIR", "/tmp"))}
    # A file of our own in each root proves the scan reads what was written during the run
    # (the runs above may leave none: pyinfra keeps nothing on the controller).
    sentinels = [tempfile.NamedTemporaryFile(dir=root, prefix="nixpush-scan-") for root in roots]
    for sentinel in sentinels:
        sentinel.write(b"scan sentinel")
        sentinel.flush()
    checked = 0
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                try:
                    stat = path.lstat()
                    if not path.is_file() or path.is_symlink() or stat.st_mtime < STARTED:
                        continue
                    if stat.st_size > 20_000_000:
                        continue
                    text = path.read_bytes().decode(errors="replace")
                except OSError:
                    continue
                checked += 1
                assert_no_plaintext(text, values, str(path))
    assert checked >= len(sentinels)  # at least the sentinels were read
    for sentinel in sentinels:
        sentinel.close()


# Idempotence, --dry and repair


def test_unchanged_run_reports_no_changes(converged):
    hosts, success, error, no_change = grand_total(run_deploy())
    assert (success, error) == ("-", "-")
    assert no_change == hosts


def test_dry_run_names_the_file_that_would_change_without_content(values, pi_secret):
    host_name, secret = pi_secret
    run_deploy()
    pending_change(host_name, secret.dest)

    # Only the Pi: with the NAS in the run, pyinfra names the table row after the NAS's own
    # secret at the same position (its row label is the first host's operation name).
    result = pyinfra("--dry", BENCH_INVENTORY, DEPLOY, "--limit", host_name, env=bench_sops.env())
    output = result.stdout + result.stderr

    assert result.returncode == 0, output[-3000:]
    assert re.search(
        rf"Install secret {secret.label} at {re.escape(secret.dest)}\s+1 \({host_name}\)", output
    ), output[-3000:]
    assert_no_plaintext(output, values, "pyinfra --dry output")
    assert on_host(host_name).file(secret.dest).mode == 0o644  # --dry changed nothing


@pytest.mark.parametrize("how", ["chmod", "chown", "content"])
def test_a_changed_file_is_repaired_then_left_alone(values, pi_secret, how):
    host_name, secret = pi_secret
    run_deploy()
    pending_change(host_name, secret.dest, how=how)

    _, success, _, _ = grand_total(run_deploy())
    assert success == "1"

    f = on_host(host_name).file(secret.dest)
    assert f.content_string == values[secret.label]
    assert (f.mode, f.user, f.group) == (secret.mode, secret.owner, secret.group)
    assert grand_total(run_deploy())[1] == "-"


# Failing before any host changes


def test_wrong_age_key_fails_clearly_and_changes_no_host(values, expected, pi_secret, tmp_path):
    host_name, secret = pi_secret
    run_deploy()
    pending_change(host_name, secret.dest)  # a change the run would make if it got that far
    before = file_states(expected)
    wrong = tmp_path / "wrong-age-key.txt"
    bench_sops.new_age_key(wrong)

    result = pyinfra("-y", BENCH_INVENTORY, DEPLOY, env=bench_sops.env(wrong))
    output = result.stdout + result.stderr

    assert result.returncode != 0
    assert "--> pyinfra error" in output and "Traceback" not in output
    assert re.search(
        r"(" + "|".join(h.name for h in fleet.HOSTS) + r"): secret \S+ \(\S+\): no key can decrypt "
        rf"{re.escape(str(bench_sops.SECRETS_FILE))}: SOPS_AGE_KEY_FILE={re.escape(str(wrong))} "
        r"holds none of the age keys it is encrypted to; set SOPS_AGE_KEY_FILE",
        output,
    ), output[-2000:]
    assert "Starting operation" not in output
    assert_no_plaintext(output, values, "the failed run's output")
    assert file_states(expected) == before


def test_missing_secrets_file_fails_clearly(values, expected):
    before = file_states(expected)
    result = pyinfra(
        "-y", BENCH_INVENTORY, "--data", "sops_file=/nonexistent/secrets.yaml", DEPLOY,
        env=bench_sops.env(),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the secrets file /nonexistent/secrets.yaml does not exist; set sops_file" in output
    assert file_states(expected) == before


# Hardening: what a careless entry or a hostile account on a host cannot do


def overlay_inventory(tmp_path: Path, extra: dict[str, dict[str, object]]) -> str:
    """The bench inventory with ``extra[host]`` added to each named host's data."""
    path = tmp_path / "inventory.py"
    path.write_text(
        "from tests.bench.inventory import _overlay, common, main, minimal, network, server\n"
        f"_EXTRA = {extra!r}\n"
        + "".join(
            f"{group} = _overlay({group}, _EXTRA)\n"
            for group in ("minimal", "common", "network", "main", "server")
        )
    )
    return str(path)


def test_a_mode_written_as_a_python_octal_number_is_refused_before_any_change(
    values, expected, pi_secret, tmp_path
):
    host_name, secret = pi_secret
    run_deploy()
    before = file_states(expected)
    entry = {"key": secret.label, "dest": secret.dest, "mode": 0o640}  # the int 416
    inventory = overlay_inventory(tmp_path, {host_name: {"secrets": [entry]}})

    result = pyinfra("-y", inventory, DEPLOY, "--limit", host_name, env=bench_sops.env())
    output = result.stdout + result.stderr

    assert result.returncode != 0
    assert (
        f"{host_name}: secrets[0] in host data mode 416 is a number, which reads two ways "
        '(as Python\'s 0o640, or as the digits "416"); write it as a string like "0600"'
    ) in output, output[-2000:]
    assert "Starting operation" not in output
    assert file_states(expected) == before
    assert on_host(host_name).file(secret.dest).mode == secret.mode  # never 0416


def test_a_secret_under_a_directory_another_account_owns_fails_that_host_only(values, tmp_path):
    host_name, drop = "pi5", "/home/nixpush-drop"  # the host's own /home
    dest = f"{drop}/pre-auth"
    ssh_to(
        host_name, f"sudo rm -rf {drop} && sudo mkdir -m 0755 {drop} && sudo chown nobody {drop}"
    )
    entry = {"key": "headscale/pre_auth", "dest": dest}
    inventory = overlay_inventory(tmp_path, {host_name: {"secrets": [entry]}})
    try:
        result = pyinfra(
            "-y", inventory, DEPLOY, "--limit", host_name, "--limit", "pi4", env=bench_sops.env()
        )
        output = result.stdout + result.stderr

        assert result.returncode != 0
        assert (
            f"{host_name}: secret headscale/pre_auth ({dest}): {drop} (owner nobody, mode 0755) "
            "can be changed by someone other than root"
        ) in output, output[-3000:]
        assert not on_host(host_name).file(dest).exists  # nobody could have swapped it
        assert "[pi4] Success" in output or "[pi4] No changes" in output
        assert_no_plaintext(output, values, "the failed run's output")
    finally:
        ssh_to(host_name, f"sudo rm -rf {drop}")


@pytest.fixture
def controller_keys_aside() -> Iterator[fleet.BenchHost]:
    """pi5's sshd also reads ``~/.ssh/authorized_keys2``, holding the controller's key, so a
    test can break ``authorized_keys`` (where nixpush adds the builder's key) and still reach it."""
    pi = fleet.host("pi5")
    controller = (fleet.BENCH_DIR / "id_ed25519.pub").read_text()
    as_user = ["runuser", "-u", pi.user, "--", "sh", "-c"]
    aside = f"umask 077 && cat > {pi.home}/.ssh/authorized_keys2"
    fleet.run(fleet.in_host(pi, [*as_user, aside]), input=controller)
    before = fleet.sshd_options(pi)["AuthorizedKeysFile"]
    fleet.set_sshd_option(pi, "AuthorizedKeysFile", ".ssh/authorized_keys .ssh/authorized_keys2")
    yield pi
    restore = (
        f"rm -f {pi.home}/.ssh/authorized_keys && umask 077 && cat > {pi.home}/.ssh/authorized_keys"
    )
    fleet.run(fleet.in_host(pi, [*as_user, restore]), input=controller)
    fleet.set_sshd_option(pi, "AuthorizedKeysFile", before)
    fleet.run(fleet.in_host(pi, ["rm", "-f", f"{pi.home}/.ssh/authorized_keys2"]))
    run_deploy("--limit", pi.name)  # the builder's key back in authorized_keys


def test_root_never_reads_or_writes_through_a_symlinked_authorized_keys(
    values, converged, controller_keys_aside
):
    pi = controller_keys_aside
    keys_file = f"{pi.home}/.ssh/authorized_keys"
    shadow = on_host(pi.name).file("/etc/shadow")
    before = (shadow.sha256sum, shadow.user, shadow.mode)
    # The deploy user owns ~/.ssh, so it can put a link there: at /etc/shadow, say.
    ssh_to(pi.name, f"rm -f {keys_file} && ln -s /etc/shadow {keys_file}")

    run_deploy("--limit", pi.name)

    shadow = on_host(pi.name).file("/etc/shadow")
    assert (shadow.sha256sum, shadow.user, shadow.mode) == before
    written = on_host(pi.name).file(keys_file)
    assert written.is_file and not written.is_symlink
    assert (written.user, written.mode) == (pi.user, 0o600)
    assert "root:" not in written.content_string  # nothing of /etc/shadow was read
    assert written.content_string.startswith("ssh-ed25519 ")


def test_leftovers_of_a_cut_write_are_removed_on_the_next_run(values, pi_secret):
    host_name, secret = pi_secret
    directory, name = secret.dest.rsplit("/", 1)
    leftover = f"{directory}/.{name}.nixpush-Ab3dE9"
    ssh_to(host_name, f"echo stale | sudo tee {leftover} >/dev/null")
    pending_change(host_name, secret.dest, how="content")

    run_deploy("--limit", host_name)

    assert not on_host(host_name).file(leftover).exists
    assert on_host(host_name).file(secret.dest).content_string == values[secret.label]
