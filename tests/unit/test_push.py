"""The push flow's models and steps, called with a fake host: exact commands and noop texts."""

from __future__ import annotations

import subprocess

import pytest
from pyinfra.facts.files import Directory

from operations.builder.nix_commands import toplevel_attr
from operations.core.models import CURRENT_SYSTEM, SYSTEM_PROFILE, Action, Builder, Plan, Safety
from operations.push import activate, build, copy
from operations.push.commands import SystemLinks, copy_command, nix_sshopts
from operations.push.runcache import RunCache
from tests.unit.fake_host import FakeHost, run, shell

OLD = "/nix/store/old-system"
NEW = "/nix/store/new-system"


def plan(action: str = "switch", current: str | None = OLD, profile: str | None = OLD,
         built: bool = False, desired: str = NEW) -> Plan:  # fmt: skip
    return Plan(
        target="pi4",
        builder="nas",
        attr="path:/f#nixosConfigurations.pi4.config.system.build.toplevel",
        desired=desired,
        current=current,
        profile=profile,
        action=Action(action),
        built=built,
    )


BUILDER = Builder(host=FakeHost("nas"), sudo=False)  # type: ignore[arg-type]
CACHE = RunCache({})


@pytest.mark.parametrize(
    ("action", "current", "profile", "built", "up_to_date"),
    [
        ("switch", NEW, NEW, False, True),
        ("switch", NEW, OLD, False, False),
        ("switch", OLD, NEW, False, False),
        ("test", NEW, OLD, False, True),
        ("boot", OLD, NEW, False, True),
        ("boot", NEW, OLD, False, False),
        ("dry-activate", NEW, OLD, False, True),
        ("build", OLD, OLD, True, True),
        ("build", NEW, NEW, False, False),
    ],
)
def test_what_up_to_date_means_for_each_action(action, current, profile, built, up_to_date):
    assert plan(action, current, profile, built).up_to_date is up_to_date


def test_each_action_knows_what_it_copies_activates_and_verifies():
    assert [a.value for a in Action if a.copies] == ["switch", "boot", "test", "dry-activate"]
    assert [a.value for a in Action if a.activates] == ["switch", "boot", "test", "rollback"]
    assert [a.value for a in Action if a.sets_profile] == ["switch", "boot", "rollback"]
    assert [a.value for a in Action if not a.contacts_target] == ["build"]
    assert [a.value for a in Action if a.confirmable] == ["switch", "test", "rollback"]


def test_up_to_date_target_builds_copies_and_activates_nothing_and_says_why():
    done = plan(current=NEW, profile=NEW)
    for op, args in (
        (build.build_toplevel, (done, BUILDER, CACHE)),
        (copy.sign_closure, (done, BUILDER, CACHE)),
        (copy.copy_closure, (done, BUILDER, CACHE, "10.0.0.2", 22, "beau")),
        (activate.dry_activate, (done, True)),
        (activate.activate_safely, (done, Safety(), [], True)),
    ):
        host = FakeHost("pi4")
        assert run(host, op, *args) == []
        assert host.noops == [f"pi4 already runs {NEW}"]


def test_built_system_is_not_built_again():
    host = FakeHost("pi4")
    assert run(host, build.build_toplevel, plan(built=True), BUILDER, CACHE) == []
    assert host.noops == [f"nas has already built {NEW}"]


def test_build_action_copies_and_activates_nothing():
    only_build = plan("build")
    host = FakeHost("pi4")
    assert run(host, copy.copy_closure, only_build, BUILDER, CACHE, "10.0.0.2", 22, "beau") == []
    assert run(host, activate.dry_activate, only_build, True) == []
    assert run(host, activate.activate_safely, only_build, Safety(), [], True) == []
    assert host.noops == [
        "build only: nothing to copy",
        "build only: nothing to activate",
        "build: no activation",
    ]


@pytest.mark.parametrize("systemd", [None, {"mode": 755}])
def test_activation_runs_detached_the_way_the_target_allows(systemd):
    fake = FakeHost("pi4").fact(Directory, systemd, path="/run/systemd/system")
    (command,) = run(fake, activate.activate_safely, plan("test"), Safety(), [], True)
    assert command.function.__name__ == "_activate"
    assert command.args == (
        activate.Activation(plan("test"), Safety(), (), True, systemd is not None),
    )


def test_rollback_dry_activates_and_activates_but_neither_builds_nor_copies():
    back = plan("rollback", built=True)
    assert Action.ROLLBACK.activates and not Action.ROLLBACK.copies
    host = FakeHost("pi4")
    assert run(host, copy.copy_closure, back, BUILDER, CACHE, "10.0.0.2", 22, "beau") == []
    # The activation dry-activates the older generation first itself (one round trip).
    assert run(host, activate.dry_activate, back, True) == []
    assert host.noops[-1] == "the activation dry-activates first (activate_safely)"
    only_dry = plan("dry-activate")
    assert shell(run(host, activate.dry_activate, only_dry, True)) == [f"_dry_activate: {only_dry}"]


@pytest.mark.parametrize(
    ("config", "attr"),
    [
        ("pi4", "path:/f#nixosConfigurations.pi4.config.system.build.toplevel"),
        ('a"b', 'path:/f#nixosConfigurations."a\\"b".config.system.build.toplevel'),
        ("x y", 'path:/f#nixosConfigurations."x y".config.system.build.toplevel'),
    ],
)
def test_configuration_names_are_quoted_in_the_flake_attribute(config, attr):
    assert toplevel_attr("path:/f", config) == attr


def test_copy_goes_to_the_deploy_user_with_strict_host_keys_and_the_port():
    assert copy_command(NEW, "beau; id", "10.0.0.2").get_raw_value() == (
        "nix --extra-experimental-features 'nix-command flakes' copy --to "
        f"'ssh-ng://beau; id@10.0.0.2' {NEW}"
    )
    options = nix_sshopts(8023)
    assert options.startswith("-p 8023 -i /root/.nixpush/deploy_ed25519 ")
    assert "StrictHostKeyChecking=yes" in options
    # curve25519 first, every default kept after it (a prefix, never a replacement list).
    assert "-o KexAlgorithms=^curve25519-sha256 " in options


def test_both_system_links_are_read_in_one_command():
    fact = SystemLinks()
    assert fact.process([f"{CURRENT_SYSTEM}={NEW}", f"{SYSTEM_PROFILE}={OLD}"]) == (NEW, OLD)
    assert fact.process([f"{CURRENT_SYSTEM}=", f"{SYSTEM_PROFILE}={OLD}"]) == (None, OLD)
    # Run for real: this machine has neither link, so both read as missing.
    out = subprocess.run(
        ["sh", "-c", fact.command().get_raw_value()], capture_output=True, text=True, check=True
    )
    assert fact.process(out.stdout.splitlines()) == (None, None)


@pytest.mark.parametrize(
    ("nixos", "fix"),
    [
        (True, "import pi4's NixOS fragment (`pyinfra @local deploys/nixos_config.py` writes it)"),
        (False, "run deploys/secrets.py"),
    ],
)
def test_an_untrusted_copy_points_a_nixos_target_at_its_fragment(monkeypatch, nixos, fix):
    """The bootstrap cannot loop: a NixOS target's missing trust is fixed by its fragment and
    a rebuild, never by deploys/secrets.py (which cannot change a NixOS /etc)."""
    failed: list[str] = []
    lines = ["error: cannot add path '/nix/store/x' because it lacks a valid signature"]
    monkeypatch.setattr(copy, "run_watched", lambda *a, **k: (False, lines))
    monkeypatch.setattr(copy, "_closure", lambda *a: copy.space.Closure({}))
    monkeypatch.setattr(copy, "_room_problem", lambda *a: None)
    monkeypatch.setattr(copy, "_pin_copy", lambda *a: None)
    monkeypatch.setattr(copy, "known_nixos", lambda target: nixos)
    monkeypatch.setattr(copy, "fail", lambda host, reason: failed.append(reason) or False)
    target = FakeHost("pi4")
    step = copy._copy.__wrapped__  # type: ignore[attr-defined]
    to = copy.Destination("10.0.0.2", 22, "beau")
    assert step(None, target, plan(), BUILDER, RunCache({}), to) is False
    (cause,) = failed
    assert "pi4's Nix does not trust nas's signing key: " + fix in cause
    assert ("deploys/secrets.py" in cause) is not nixos


def test_boot_files_compare_as_nixos_auto_upgrade_does_plus_kernel_params():
    from operations.core.boot import BootFiles, describe, parse_boot_lines

    lines = [
        "nixpush-boot /run/booted-system kernel /nix/store/a-linux-6.1/Image",
        "nixpush-boot /run/booted-system initrd /nix/store/i-initrd/initrd",
        "nixpush-boot /run/booted-system kernel-modules /nix/store/m-modules/lib/modules",
        "nixpush-boot /run/booted-system kernel-params console=ttyS0 quiet",
        "nixpush-boot /run/current-system absent",
        "current=/nix/store/x",
    ]
    files = parse_boot_lines(lines)
    assert list(files) == ["/run/booted-system"]
    booted = files["/run/booted-system"]
    assert booted.kernel_params == "console=ttyS0 quiet"
    assert booted.changes_to(booted) == ()
    new = BootFiles("/nix/store/b-linux-6.2/Image", booted.initrd, booted.kernel_modules, "")
    changes = booted.changes_to(new)
    assert changes == (
        "kernel /nix/store/a-linux-6.1/Image → /nix/store/b-linux-6.2/Image",
        "kernel-params console=ttyS0 quiet → none",
    )
    assert describe(changes).startswith("reboot needed: kernel /nix/store/a-linux-6.1/Image")


def test_boot_files_command_quotes_the_system_path():
    from operations.push.reboot import boot_files_command

    command = boot_files_command(["/nix/store/x; whoami"]).get_raw_value()
    assert "'/nix/store/x; whoami'" in command
    assert "readlink -f" in command and "kernel-params" in command


def test_metrics_say_whether_a_reboot_is_required():
    from operations.run.metrics import LastSuccess, render

    report = {
        "mode": "check",
        "exit_code": 0,
        "started": "2025-01-01T00:00:00+00:00",
        "duration_s": 1.0,
        "deploys": [],
        "hosts": {
            "pi4": {"status": "unchanged", "cause": "", "reboot_required": True},
            "pi5": {"status": "unchanged", "cause": ""},
        },
    }
    text = render(report, LastSuccess(None, {}))
    assert 'nixpush_host_reboot_required{host="pi4",mode="check"} 1' in text
    assert 'nixpush_host_reboot_required{host="pi5"' not in text


@pytest.mark.parametrize(("action", "pinned"), [("switch", True), ("test", True),
                                                ("dry-activate", False)])  # fmt: skip
def test_a_copy_to_be_activated_gets_a_gc_root_first_as_root(monkeypatch, action, pinned):
    from types import SimpleNamespace

    from operations.push.switch import pin_copy_command

    calls: list[tuple[str, bool]] = []

    def run_on(host, command, *, sudo, doing):
        calls.append((command.get_raw_value(), sudo))
        return True, []

    monkeypatch.setattr(copy, "run_on", run_on)
    cache = RunCache({"pi4": SimpleNamespace(sudo=True)})  # type: ignore[dict-item]
    assert copy._pin_copy(FakeHost("pi4"), plan(action), cache) is None
    assert calls == ([(pin_copy_command(NEW).get_raw_value(), True)] if pinned else [])

    monkeypatch.setattr(copy, "run_on", lambda *a, **k: (False, ["ln: Permission denied"]))
    if pinned:
        assert copy._pin_copy(FakeHost("pi4"), plan(action), cache) == (
            f"making a GC root for {NEW} on pi4 failed: ln: Permission denied"
        )


def test_the_activation_names_the_copys_gc_root():
    from operations.push.switch import ActivationRun, copy_root_name, program_args

    run = ActivationRun.create(plan(), Safety(), systemd=False)
    assert run.copied == copy_root_name(NEW)
    assert program_args(run)[-1].obj == copy_root_name(NEW)
