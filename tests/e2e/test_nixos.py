"""
A NixOS fleet on the bench: ``deploys/nixos_config.py`` generates each host's fragment from
``tests/bench/nixos_inventory.py`` (pull builds and the schedule on); the fragments parse, hold
the keys derived from sops and no secret. Then the NAS and pi4 are marked NixOS (``/etc/NIXOS``)
and the fragments' options are applied by hand, the way a NixOS rebuild writes them into
``/etc``: ``deploys/nas.py``, ``deploys/pull.py``, ``deploys/schedule.py`` and
``deploys/nixos_check.py`` find both already configured and write nothing, and
``deploys/pi.py`` deploys pi4 through the trust the fragment gives it. Every file touched is
put back afterwards, and /etc/NIXOS removed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from operations.builder.pull import PULL_KEY_PATH
from operations.core.models import NIXOS_MARKER
from operations.data.fleet import check_fleet
from operations.trust.keys import DEPLOY_KEY_PATH, SIGNING_KEY_PATH
from tests.bench import fleet, nixos
from tests.bench import nixos_inventory as bench_nixos
from tests.bench import sops as bench_sops
from tests.bench.client import pyinfra
from tests.checklist import checklist_steps
from tests.e2e.test_pi import current, desired_path, new_versions
from tests.unit.conftest import REPO, load_inventory
from tests.unit.test_fragments import required_nixfmt, required_nixos_eval_check

INVENTORY = "tests/bench/nixos_inventory.py"
NAS, PI = "nas", "pi4"
NIX_CONF = "/etc/nix/nix.conf"
UNIT_DIR = "/etc/systemd/system"
SSH_EXTRA = "/etc/ssh/ssh_config.d/nixos-programs-ssh.conf"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return pyinfra("-y", *args, env=bench_sops.env(), timeout=600)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def fragments(push_ready: None) -> Iterator[dict[str, Path]]:
    """The fragments as the CLI writes them: host -> path (the NAS builds, the push keys are
    installed, as on the owner's NAS)."""
    fragments_dir = bench_nixos.FRAGMENTS_DIR
    result = run("@local", "deploys/nixos_config.py", "--data", f"nixpush_inventory={INVENTORY}")
    assert result.returncode == 0, output(result)
    # The hosts' modules only: the Nix environment the NAS's units run nixpush with is in env/.
    yield {path.stem: path for path in sorted(fragments_dir.glob("*.nix"))}
    shutil.rmtree(fragments_dir)


def secret_values() -> list[str]:
    """Every secret of the bench's sops file, and each line of the multi-line ones."""
    values = [bench_sops.value(key).strip() for key in bench_sops.keys()]
    lines = [line for value in values for line in value.splitlines() if len(line) > 20]
    body = [value.split(":", 1)[1] for value in values if value.startswith("nixpush-bench")]
    return [*values, *lines, *body]


def test_fragments_parse_hold_the_derived_keys_and_no_secret(fragments):
    specs = check_fleet(load_inventory(REPO / INVENTORY, REPO))
    assert set(fragments) == set(specs)  # the NAS and every Pi: each has something to set
    secrets = secret_values()
    for name, path in fragments.items():
        text = path.read_text()
        parsed = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True)
        assert parsed.returncode == 0, parsed.stderr
        assert not [value for value in secrets if value in text], name
        assert "PRIVATE KEY" not in text
        # Only the arguments it uses (deadnix would remove the others).
        assert ("{ pkgs, ... }:" in text) == ("pkgs." in text or "nixpushPython" in text), name
        assert "config," not in text and "lib," not in text

    nas = nixos.evaluate(fragments[NAS])
    assert nixos.get(nas, "boot.binfmt.emulatedSystems") == ["aarch64-linux"]
    assert nixos.get(nas, "nix.settings.max-jobs") == 8
    served = nixos.get(nas, "nix.sshServe")
    assert (served["enable"], served["protocol"], served["write"], served["trusted"]) == (
        True, "ssh-ng", True, True,
    )  # fmt: skip
    # The public halves of each Pi's pull key, as ssh-keygen derives them from the secret.
    for pi in fleet.PIS:
        public = derive_public(bench_sops.value(bench_sops.pull_key(pi.name)))
        assert f"{public} nixpush-pull:{pi.name}" in served["keys"]
    timers = nixos.get(nas, "systemd.timers")
    assert timers["nixpush-check"]["wantedBy"] == ["timers.target"]
    assert timers["nixpush-check"]["timerConfig"]["OnCalendar"] == "hourly"
    check = nixos.get(nas, "systemd.services")["nixpush-check"]
    assert (
        check["serviceConfig"]["ExecStart"].startswith('"')
        and '"check"' in (check["serviceConfig"]["ExecStart"])
    )
    # nixpush from nixpkgs' Python (the environment written beside the fragments), not a venv.
    assert check["path"] == [
        nixos.STUB_ENV,
        *(f"{nixos.STUB_STORE}-{name}" for name in ("sops", "openssh", "git")),
    ]
    assert check["serviceConfig"]["ExecStart"].startswith(f'"{nixos.STUB_ENV}/bin/python" "-m"')
    assert (fragments[NAS].parent / "env" / "default.nix").is_file()

    pi = nixos.evaluate(fragments[PI])
    signing = bench_sops.value("nix/nas_signing_key").strip()
    assert nixos.get(pi, "nix.settings.extra-trusted-public-keys") == [nix_public(signing)]
    assert nixos.get(pi, "nix.settings.trusted-public-keys") is None  # cache.nixos.org stays
    deploy_public = derive_public(bench_sops.value("ssh/nas_deploy"))
    authorized = nixos.get(pi, "users.users.beau.openssh.authorizedKeys.keys")
    assert [" ".join(key.split()[:2]) for key in authorized] == [deploy_public]
    assert nixos.sudoers_lines(pi) == ["beau ALL=(root) NOPASSWD: ALL"]
    assert nixos.get(pi, "nix.distributedBuilds") is True
    (machine,) = nixos.get(pi, "nix.buildMachines")
    assert (machine["hostName"], machine["sshUser"], machine["sshKey"]) == (
        "nixpush-builder-nas", "nix-ssh", PULL_KEY_PATH,
    )  # fmt: skip
    nas_key_file = fleet.host(NAS).dir / "ssh" / "ssh_host_ed25519_key.pub"
    nas_key = " ".join(nas_key_file.read_text().split()[:2])
    assert nixos.get(pi, "programs.ssh.knownHosts")["nixpush-builder-nas"]["publicKey"] == nas_key

    again = run("@local", "deploys/nixos_config.py", "--data", f"nixpush_inventory={INVENTORY}")
    assert again.returncode == 0, output(again)
    # A second run changes nothing: every host "No Changes".
    assert re.search(r"Grand total\s+(\d+)\s+-\s+-\s+\1\s", output(again)), output(again)


def derive_public(private_key: str) -> str:
    result = subprocess.run(
        ["ssh-keygen", "-y", "-f", "/dev/stdin"], input=private_key, capture_output=True, text=True
    )
    return " ".join(result.stdout.split()[:2])


def nix_public(secret: str) -> str:
    import base64

    name, encoded = secret.split(":", 1)
    return f"{name}:{base64.b64encode(base64.b64decode(encoded)[32:]).decode()}"


# -- NixOS hosts, configured by hand from their fragments --------------------------------


def nas_files(options: dict) -> dict[str, str]:
    units = nixos.unit_files(options)
    return {
        **{f"{UNIT_DIR}/{unit}": text for unit, text in units.items()},
        "/etc/ssh/authorized_keys.d/nix-ssh": "".join(
            f"{key}\n" for key in nixos.get(options, "nix.sshServe.keys")
        ),
    }


def pi_files(options: dict, user: str) -> dict[str, str]:
    keys = nixos.get(options, f"users.users.{user}.openssh.authorizedKeys.keys")
    return {
        f"/etc/ssh/authorized_keys.d/{user}": "".join(f"{key}\n" for key in keys),
        "/etc/sudoers.d/nixos": "".join(f"{line}\n" for line in nixos.sudoers_lines(options)),
        "/etc/nix/machines": "".join(f"{line}\n" for line in nixos.machines_lines(options)),
        SSH_EXTRA: nixos.get(options, "programs.ssh.extraConfig"),
        "/etc/ssh/ssh_known_hosts": "".join(
            f"{line}\n" for line in nixos.known_hosts_lines(options)
        ),
    }


@pytest.fixture
def nixos_hosts(fragments: dict[str, Path]) -> Iterator[dict[str, nixos.Snapshot]]:
    """The NAS and pi4 marked NixOS, their fragments applied by hand; put back after each test
    (the checklist's test starts from hosts without them: no schedule before its step 9)."""
    nas, pi = fleet.host(NAS), fleet.host(PI)
    nas_options, pi_options = nixos.evaluate(fragments[NAS]), nixos.evaluate(fragments[PI])
    written = {NAS: nas_files(nas_options), PI: pi_files(pi_options, pi.user)}
    wants = {
        f"{UNIT_DIR}/{target}.wants/{unit}"
        for unit, targets in nixos.wanted_by(nas_options).items()
        for target in targets
    }
    authorized = f"{pi.home}/.ssh/authorized_keys"
    snapshots = {
        NAS: nixos.Snapshot(nas, [NIXOS_MARKER, NIX_CONF, *written[NAS], *wants]),
        PI: nixos.Snapshot(pi, [NIXOS_MARKER, NIX_CONF, authorized, *written[PI]]),
    }
    sshd_before = fleet.sshd_options(pi)["AuthorizedKeysFile"]
    new_dirs = {
        h.name: [
            d for d in ("/etc/ssh/authorized_keys.d",) if not nixos.shell(h, f"ls -d {d} || true")
        ]
        for h in (nas, pi)
    }
    try:
        for h, options in ((nas, nas_options), (pi, pi_options)):
            base = fleet.nix_conf_text(h).splitlines()
            nixos.write(h, NIX_CONF, "\n".join([*base, *nixos.nix_conf_lines(options)]) + "\n")
            for path, text in written[h.name].items():
                nixos.write(h, path, text, "0440" if "sudoers" in path else "0444")
            nixos.restart_nix_daemon(h)
        for link in wants:
            unit = link.rsplit("/", 1)[1]
            nixos.shell(nas, f"mkdir -p {Path(link).parent} && ln -sfn ../{unit} {link}")
        # What NixOS's sshd reads, and only what it reads: the deploy key is not in ~/.ssh.
        deploy_key = derive_public(bench_sops.value("ssh/nas_deploy")).split()[1]
        kept = [line for line in (nixos.read(pi, authorized) or "").splitlines()
                if deploy_key not in line]  # fmt: skip
        nixos.write(pi, authorized, "".join(f"{line}\n" for line in kept), "0600")
        nixos.shell(pi, f"chown {pi.user}: {authorized}")
        fleet.set_sshd_option(
            pi, "AuthorizedKeysFile", ".ssh/authorized_keys /etc/ssh/authorized_keys.d/%u"
        )
        yield snapshots
    finally:
        fleet.set_sshd_option(fleet.host(PI), "AuthorizedKeysFile", sshd_before)
        for name, snapshot in snapshots.items():
            snapshot.restore()
            nixos.shell(fleet.host(name), f"chown {fleet.host(name).user}: {authorized}"
                        if name == PI else "true")  # fmt: skip
            nixos.restart_nix_daemon(fleet.host(name))
            for directory in new_dirs[name]:
                nixos.shell(fleet.host(name), f"rmdir {directory}")
            assert snapshot.unchanged()


def mark_nixos(names: list[str]) -> None:
    for name in names:
        nixos.shell(fleet.host(name), f"touch {NIXOS_MARKER}")


def test_nixos_check_names_what_a_host_lacks_until_its_fragment_is_applied(fragments):
    nas, pi = fleet.host(NAS), fleet.host(PI)
    before = {h.name: nixos.Snapshot(h, [NIXOS_MARKER, NIX_CONF]) for h in (nas, pi)}
    try:
        mark_nixos([NAS, PI])
        # pi4 as a fresh NixOS Pi: its Nix does not trust the builder yet.
        nixos.write(pi, NIX_CONF, fleet.nix_conf_text(pi))
        nixos.restart_nix_daemon(pi)
        result = run(INVENTORY, "deploys/nixos_check.py", "--limit", NAS, "--limit", PI)
        text = output(result)
        assert result.returncode != 0
        signing = nix_public(bench_sops.value("nix/nas_signing_key").strip())
        assert f'nix.settings.extra-trusted-public-keys = [ "{signing}" ];' in text
        # The first check a host fails stops its others (pyinfra drops a failed host): the
        # NAS has the Nix settings nas.py gave it, not nix.sshServe.
        assert "nas runs NixOS: set nix.sshServe.enable = true; and" in text
        assert "writes them to nas's generated fragment" in text
    finally:
        for snapshot in before.values():
            snapshot.restore()
        nixos.restart_nix_daemon(pi)
    assert all(snapshot.unchanged() for snapshot in before.values())


def test_nixos_hosts_with_their_fragments_applied_are_already_configured(nixos_hosts):
    mark_nixos([NAS, PI])
    watched = {
        NAS: nixos.Snapshot(fleet.host(NAS), [NIX_CONF, f"{UNIT_DIR}/nixpush-check.service",
                                             DEPLOY_KEY_PATH, SIGNING_KEY_PATH]),
        PI: nixos.Snapshot(fleet.host(PI), [NIX_CONF, f"{fleet.host(PI).home}/.ssh/authorized_keys",
                                            "/etc/nix/machines", SSH_EXTRA]),
    }  # fmt: skip

    checks = {
        ("deploys/nixos_check.py", "--limit", NAS, "--limit", PI): [
            f"{PI} runs NixOS and already lets the builder in as beau, with sudo",
            f"{NAS} runs NixOS and already has nixpush-check.service",
        ],
        ("deploys/nas.py", "--limit", NAS): [
            f"{NAS} runs NixOS and its Nix already builds aarch64-linux with max-jobs = 8",
            f"{NAS} runs NixOS and already emulates aarch64-linux",
            f"{NAS} runs NixOS and nix.sshServe already serves",
        ],
        ("deploys/pull.py", "--limit", PI): [
            f"{PI} runs NixOS and already builds on ssh-ng://nix-ssh@nixpush-builder-nas",
        ],
        ("deploys/schedule.py", "--limit", NAS): [
            f"{NAS} runs NixOS and already has nixpush-check.service, nixpush-check.timer",
        ],
    }
    for args, noops in checks.items():
        result = run("-v", INVENTORY, *args)
        text = output(result)
        assert result.returncode == 0, text[-3000:]
        for noop in noops:
            assert noop in text, (args, text[-3000:])
    assert all(snapshot.unchanged() for snapshot in watched.values())


def test_pi_py_deploys_the_nixos_pi_through_the_trust_its_fragment_gives(nixos_hosts):
    mark_nixos([NAS, PI])
    pi = fleet.host(PI)
    watched = nixos.Snapshot(pi, [NIX_CONF, f"{pi.home}/.ssh/authorized_keys"])
    new_versions(PI)
    wanted = desired_path(PI)

    result = pyinfra("-y", "-v", "tests/bench/inventory.py", "deploys/pi.py", "--limit", PI,
                     env=bench_sops.env(), timeout=600)  # fmt: skip

    assert result.returncode == 0, output(result)[-3000:]
    assert current(PI) == wanted
    assert f"{PI} runs NixOS and its configuration already authorizes the key" in output(result)
    assert f"{PI} runs NixOS and its Nix already trusts nixpush-bench-1:" in output(result)
    assert watched.unchanged()  # nothing written on the NixOS Pi: the fragment did it


# -- the owner's layout: the README's checklist, command by command ----------------------

OWNER_INVENTORY = "tests/bench/nixos_owner_inventory.py"
BINFMT_MISC = "/proc/sys/fs/binfmt_misc"
# Owner host -> the bench host standing in for it (the laptop is down: none).
STAND_IN = {"nas": "nas", "pi4": "pi4", "grill": "pc1"}


def owner_command(command: list[str]) -> list[str]:
    """A checklist command's pyinfra arguments, the bench's copy of the owner's inventory in
    place of inventory.py (as the inventory, or as the fragments' @local run's data)."""
    assert command[0] == "pyinfra", command
    if command[1] == "@local":
        return [*command[1:], "--data", f"nixpush_inventory={OWNER_INVENTORY}"]
    assert command[1] == "inventory.py", command
    return [OWNER_INVENTORY, *command[2:]]


def test_fragments_are_written_with_every_host_of_the_fleet_down(bench):
    """deploys/nixos_config.py reaches no host: with every address of the owner's fleet
    unanswered, every fragment is written (the laptop's too), and nothing else."""
    from tests.bench import nixos_owner_inventory as owner
    from tests.bench import nixos_sops

    nixos_sops.write_push_keys(owner.OWN_SOPS_FILE)
    env = {**bench_sops.env(), "NIXPUSH_BENCH_OWNER_DOWN": "1"}
    try:
        result = pyinfra("-y", *owner_command(["pyinfra", "@local", "deploys/nixos_config.py"]),
                         env=env, timeout=600)  # fmt: skip
        assert result.returncode == 0, output(result)[-3000:]
        written = sorted(str(p.relative_to(owner.FRAGMENTS_DIR))
                         for p in owner.FRAGMENTS_DIR.rglob("*.nix"))  # fmt: skip
        # Every host's, and the Nix environment (always, in a directory of its own).
        assert written == ["env/default.nix", "grill.nix", "laptop.nix", "nas.nix", "pi4.nix"]
        for name in ("nas", "pi4", "grill", "laptop"):
            assert f"Write {name}'s NixOS fragment ({name}.nix)" in output(result)
        # Run over the fleet's inventory, pyinfra itself stops with every host down ("No hosts
        # remaining"), before any deploy code; with hosts up, the deploy names the command.
        down = pyinfra("-y", OWNER_INVENTORY, "deploys/nixos_config.py", env=env, timeout=600)
        assert down.returncode != 0 and "No hosts remaining" in output(down)
        refused = pyinfra("-y", OWNER_INVENTORY, "deploys/nixos_config.py", "--limit", "nas",
                          env=bench_sops.env(), timeout=600)  # fmt: skip
        assert refused.returncode != 0
        assert "run `pyinfra @local deploys/nixos_config.py`" in output(refused)
    finally:
        shutil.rmtree(owner.FRAGMENTS_DIR, ignore_errors=True)


def target_files(options: dict, user: str) -> dict[str, str]:
    """What NixOS generates in /etc for a push target's fragment (pull off or on)."""
    keys = nixos.get(options, f"users.users.{user}.openssh.authorizedKeys.keys")
    files = {f"/etc/ssh/authorized_keys.d/{user}": "".join(f"{key}\n" for key in keys)}
    sudoers = nixos.sudoers_lines(options)
    if sudoers:
        files["/etc/sudoers.d/nixos"] = "".join(f"{line}\n" for line in sudoers)
    return files


class Bootstrap:
    """Owner hosts marked NixOS with their fragments applied by hand (what the first
    ``nixos-rebuild`` with the fragment imported does); ``undo`` puts every host back."""

    def __init__(self) -> None:
        self.snapshots: list[nixos.Snapshot] = []
        self.sshd: dict[str, str] = {}
        self.mounts: list[fleet.BenchHost] = []
        self.dirs: list[tuple[fleet.BenchHost, str]] = []

    def apply(self, owner_name: str, fragment: Path) -> None:
        h = fleet.host(STAND_IN[owner_name])
        options = nixos.evaluate(fragment)
        files = {**nas_files_of(options), **(target_files(options, h.user) if
                 nixos.get(options, f"users.users.{h.user}") else {})}  # fmt: skip
        wants = {
            f"{UNIT_DIR}/{target}.wants/{unit}"
            for unit, targets in nixos.wanted_by(options).items()
            for target in targets
        }
        authorized = f"{h.home}/.ssh/authorized_keys"
        self.snapshots.append(
            nixos.Snapshot(h, [NIXOS_MARKER, NIX_CONF, authorized, *files, *wants])
        )
        for directory in sorted({str(Path(path).parent) for path in [*files, *wants]}):
            if not nixos.shell(h, f"[ -d {directory} ] && echo yes || true").strip():
                self.dirs.append((h, directory))
        base = fleet.nix_conf_text(h).splitlines()
        nixos.write(h, NIX_CONF, "\n".join([*base, *nixos.nix_conf_lines(options)]) + "\n")
        for path, text in files.items():
            nixos.write(h, path, text, "0440" if "sudoers" in path else "0444")
        for link in wants:
            unit = link.rsplit("/", 1)[1]
            nixos.shell(h, f"mkdir -p {Path(link).parent} && ln -sfn ../{unit} {link}")
        nixos.shell(h, f"touch {NIXOS_MARKER}")
        if nixos.get(options, "boot.binfmt.emulatedSystems"):
            # NixOS mounts binfmt_misc at boot (the handlers are the machine's, registered by
            # the bench); a bench host's own mount namespace does not have it yet.
            mounted = nixos.shell(h, f"[ -e {BINFMT_MISC}/status ] && echo yes || true")
            if not mounted.strip():
                nixos.shell(h, f"mount -t binfmt_misc binfmt_misc {BINFMT_MISC}")
                self.mounts.append(h)
        nixos.restart_nix_daemon(h)
        if any(path.startswith("/etc/ssh/authorized_keys.d/") for path in files):
            self.sshd[h.name] = fleet.sshd_options(h)["AuthorizedKeysFile"]
            fleet.set_sshd_option(
                h, "AuthorizedKeysFile", ".ssh/authorized_keys /etc/ssh/authorized_keys.d/%u"
            )

    def undo(self) -> None:
        for h in self.mounts:
            nixos.shell(h, f"umount {BINFMT_MISC}")
        for name, before in self.sshd.items():
            fleet.set_sshd_option(fleet.host(name), "AuthorizedKeysFile", before)
        for snapshot in reversed(self.snapshots):
            snapshot.restore()
            h = snapshot.host
            if h.user != "root":
                nixos.shell(h, f"chown {h.user}: {h.home}/.ssh/authorized_keys 2>/dev/null || true")
            nixos.restart_nix_daemon(h)
            assert snapshot.unchanged()
        for h, directory in reversed(self.dirs):
            nixos.shell(h, f"rmdir {directory}")


def nas_files_of(options: dict) -> dict[str, str]:
    """A builder's generated files: its units, and nix-ssh's keys when pull is on."""
    files = {f"{UNIT_DIR}/{unit}": text for unit, text in nixos.unit_files(options).items()}
    keys = nixos.get(options, "nix.sshServe.keys")
    if keys:
        files["/etc/ssh/authorized_keys.d/nix-ssh"] = "".join(f"{key}\n" for key in keys)
    return files


def test_the_first_deploy_checklist_passes_command_by_command_on_the_owners_layout(bench):
    """The README's first-deploy checklist, every command as the owner types it (with -y, and
    the bench's copy of the owner's inventory), exits 0; the hand steps between them are the
    bootstrap."""
    from tests.bench import nixos_owner_inventory as owner
    from tests.bench import nixos_sops

    bench_sops.ensure()
    nixos_sops.write_push_keys(owner.OWN_SOPS_FILE)  # nixpush's own file: the owner's key only
    nixfmt, nixos_eval = required_nixfmt(), required_nixos_eval_check()
    # Step 1's environment: nothing here can enter it (no nixpkgs); what it is made of parses,
    # is nixfmt-clean, and is what the fragments run writes beside the fragments.
    step1 = [str(REPO / "shell.nix"), str(REPO / "default.nix")]
    for check in (["nix-instantiate", "--parse"], [nixfmt, "--check"]):
        checked = subprocess.run([*check, *step1], capture_output=True, text=True)
        assert checked.returncode == 0, (check, checked.stderr)
    steps = checklist_steps()
    assert [number for number, _ in steps] == ["6", "7", "8", "9", "10", "11"]
    env = bench_sops.env()
    bootstrap = Bootstrap()
    new_versions("pi4", "pc1")
    try:
        for number, commands in steps:
            if number == "7":  # the bootstrap: nas and pi4 rebuilt with their fragments
                bootstrap.apply("nas", owner.FRAGMENTS_DIR / "nas.nix")
                bootstrap.apply("pi4", owner.FRAGMENTS_DIR / "pi4.nix")
            if number == "9":  # the schedule enabled in group_data/server.py
                env = {**env, "NIXPUSH_BENCH_OWNER_SCHEDULE": "1"}
            if number == "10":  # grill's and laptop's ssh_host_key in the inventory
                env = {**env, "NIXPUSH_BENCH_OWNER_LATER": "1"}
            if number == "11":  # grill rebuilt with its fragment (the laptop sleeps)
                bootstrap.apply("grill", owner.FRAGMENTS_DIR / "grill.nix")
            for command in commands:
                if number == "9" and "deploys/schedule.py" in command:
                    # nas rebuilt with its regenerated fragment: the timers
                    bootstrap.apply("nas", owner.FRAGMENTS_DIR / "nas.nix")
                args = owner_command(command)
                result = pyinfra("-y", *args, env=env, timeout=900)
                assert result.returncode == 0, (number, command, output(result)[-4000:])
                if "deploys/nixos_config.py" in command:
                    check_generated(owner.FRAGMENTS_DIR, nixfmt, nixos_eval)
                    nas_text = (owner.FRAGMENTS_DIR / "nas.nix").read_text()
                    assert ("systemd.timers" in nas_text) == (number != "6"), number
                if number == "10":  # regenerating after adding host keys changes no file
                    text = output(result)
                    assert re.search(r"Grand total\s+(\d+)\s+-\s+-\s+\1\s", text), text
        assert current("pi4") == desired_path("pi4")
        assert current("pc1") == desired_path("pc1")
    finally:
        bootstrap.undo()
        shutil.rmtree(owner.FRAGMENTS_DIR, ignore_errors=True)


def check_generated(directory: Path, nixfmt: str, nixos_eval: Path) -> None:
    """Every generated file as the owner's pre-commit sees it (nixfmt --check), the same
    environment as the checkout's default.nix imports, and every host's module through
    nixos-eval."""
    generated = sorted(str(path) for path in directory.rglob("*.nix"))
    formatted = subprocess.run([nixfmt, "--check", *generated], capture_output=True, text=True)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    environment = REPO / "operations" / "nixos" / "env.nix"
    assert (directory / "env" / "default.nix").read_text() == environment.read_text()
    hosts = sorted(str(path) for path in directory.glob("*.nix"))
    evaluated = subprocess.run([str(nixos_eval), *hosts], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr


def test_a_push_key_file_a_pushed_host_can_decrypt_is_refused_before_anything_runs(bench):
    """A real sops file holding the push keys, encrypted to the owner and to pi4's sops-nix
    key (derived from its SSH host key, as ssh-to-age does): pi4 really can decrypt it, and
    deploys/secrets.py stops before any host changes, naming the fix."""
    from cryptography.hazmat.primitives import serialization

    from operations.trust.recipients import bech32_encode, ssh_to_age
    from tests.bench import nixos_owner_inventory as owner
    from tests.bench import nixos_sops

    pi = fleet.host("pi4")
    host_key = " ".join((pi.dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    shared = bench_sops.SOPS_DIR / "shared-with-pi4.yaml"
    nixos_sops.write_push_keys(shared, [ssh_to_age(host_key)])
    # pi4's own age identity (sops-nix's, from its host key): it decrypts the deploy key.
    private = serialization.load_ssh_private_key(
        (pi.dir / "ssh" / "ssh_host_ed25519_key").read_bytes(), None
    )
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    import hashlib

    identity = bech32_encode("age-secret-key-", hashlib.sha512(seed).digest()[:32]).upper()
    pi_key_file = bench_sops.SOPS_DIR / "pi4-age-key.txt"
    pi_key_file.write_text(identity + "\n")
    pi_key_file.chmod(0o600)
    try:
        read = subprocess.run(
            [bench_sops.sops_program(), "--disable-version-check", "-d", "--extract",
             '["ssh"]["nas_deploy"]', str(shared)],
            env={"SOPS_AGE_KEY_FILE": str(pi_key_file)}, capture_output=True, text=True,
        )  # fmt: skip
        assert read.returncode == 0 and "PRIVATE KEY" in read.stdout  # what the check prevents
        before = nixos.Snapshot(fleet.host(NAS), [DEPLOY_KEY_PATH, SIGNING_KEY_PATH])
        env = {**bench_sops.env(), "NIXPUSH_BENCH_OWNER_SOPS": str(shared)}
        result = pyinfra("-y", OWNER_INVENTORY, "deploys/secrets.py", "--limit", "nas",
                         "--limit", "pi4", env=env, timeout=600)  # fmt: skip
        text = output(result)
        assert result.returncode != 0
        assert f"{shared} is also encrypted to the age key of pi4's SSH host key" in text, text
        assert "set nixpush_sops_file to it" in text
        assert before.unchanged()
        # nixpush's own file, encrypted to the owner only, is accepted.
        nixos_sops.write_push_keys(owner.OWN_SOPS_FILE)
        ok = pyinfra("-y", OWNER_INVENTORY, "deploys/secrets.py", "--limit", "nas",
                     "--limit", "pi4", env=bench_sops.env(), timeout=600)  # fmt: skip
        assert ok.returncode == 0, output(ok)[-3000:]
    finally:
        pi_key_file.unlink()
        shared.unlink()


def test_a_push_key_file_also_encrypted_to_a_second_age_key_is_refused_until_allowed(bench):
    """Every recipient of the push-key file is a reader, not only the hosts' keys: one also
    encrypted to a second age key (no host's) is refused before anything runs, naming that
    key; listed in nixpush_sops_recipients (a backup key), it is accepted."""
    from tests.bench import nixos_sops

    second_key = bench_sops.SOPS_DIR / "second-age-key.txt"
    second_key.unlink(missing_ok=True)
    bench_sops.new_age_key(second_key)
    second = bench_sops.age_recipient(second_key)
    shared = bench_sops.SOPS_DIR / "also-a-second-key.yaml"
    nixos_sops.write_push_keys(shared, [second])
    env = {**bench_sops.env(), "NIXPUSH_BENCH_OWNER_SOPS": str(shared)}
    limits = ("--limit", NAS, "--limit", PI)
    try:
        before = nixos.Snapshot(fleet.host(NAS), [DEPLOY_KEY_PATH, SIGNING_KEY_PATH])
        result = pyinfra("-y", OWNER_INVENTORY, "deploys/secrets.py", *limits, env=env,
                         timeout=600)  # fmt: skip
        text = output(result)
        assert result.returncode != 0, text
        assert (
            f"{shared} is also encrypted to age key {second}, besides the controller's age key"
        ) in text, text
        assert "goes in nas's nixpush_sops_recipients" in text
        assert before.unchanged()
        allowed = f'nixpush_sops_recipients=["{second}"]'
        ok = pyinfra("-y", OWNER_INVENTORY, "deploys/secrets.py", *limits, "--data", allowed,
                     env=env, timeout=600)  # fmt: skip
        assert ok.returncode == 0, output(ok)[-3000:]
    finally:
        second_key.unlink(missing_ok=True)
        shared.unlink(missing_ok=True)
