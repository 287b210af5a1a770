from __future__ import annotations

import base64
import json

import pytest
from pyinfra.api import OperationError
from pyinfra.facts.server import User

from operations.builder import nix
from operations.builder.nix import (
    NIX_CONF,
    NixConfig,
    NixConfText,
    nix_settings,
    restart_daemon,
    restart_nix_daemon,
    set_nix_conf,
    wanted_nix_settings,
)
from tests.unit.fake_host import FakeHost, failure, nix_host, run, shell, written

# `nix --extra-experimental-features nix-command show-config --json` from Debian 12's Nix 2.8.0
# (nix.conf: `sandbox = false`), descriptions dropped.
SHOW_CONFIG = (
    '{"sandbox": {"aliases": ["build-use-chroot", "build-use-sandbox"], "defaultValue": true, '
    '"documentDefault": true, "value": false}, "max-jobs": {"aliases": ["build-max-jobs"], '
    '"defaultValue": 1, "documentDefault": true, "value": 1}, "extra-platforms": {"aliases": [], '
    '"defaultValue": ["i686-linux", "x86_64-v1-linux", "x86_64-v2-linux", "x86_64-v3-linux"], '
    '"documentDefault": false, "value": ["i686-linux", "x86_64-v1-linux", "x86_64-v2-linux", '
    '"x86_64-v3-linux"]}, "sandbox-paths": {"aliases": ["build-chroot-dirs", '
    '"build-sandbox-paths"], "defaultValue": [], "documentDefault": true, "value": []}, '
    '"system": {"aliases": [], "defaultValue": "x86_64-linux", "documentDefault": true, '
    '"value": "x86_64-linux"}}'
)
DEBIAN_NIX_CONF = """\
# see https://nixos.org/nix/manual/#sec-conf-file

# So far the sandbox feature does not seem to work on Debian:
# https://github.com/NixOS/nixpkgs/pull/47794#issuecomment-429575989
sandbox = false
"""
DEFAULT_PLATFORMS = "i686-linux x86_64-v1-linux x86_64-v2-linux x86_64-v3-linux"
CONFIG = NixConfig().process([SHOW_CONFIG])

FRAGMENT_HINT = (
    "(`pyinfra @local deploys/nixos_config.py` writes them to nas's generated fragment, "
    "which its configuration imports)"
)


# Pure: set_nix_conf


def test_appends_new_keys_keeping_comments():
    assert set_nix_conf(DEBIAN_NIX_CONF, {"max-jobs": "8"}) == DEBIAN_NIX_CONF + "max-jobs = 8\n"


def test_replaces_in_place():
    text = "# top\nmax-jobs = 2\n# keep me\ncores = 0\n"
    assert set_nix_conf(text, {"max-jobs": "8"}) == "# top\nmax-jobs = 8\n# keep me\ncores = 0\n"


def test_replaces_last_and_drops_earlier_duplicates():
    text = "max-jobs = 1\ncores = 2\nmax-jobs = 4\n# end\n"
    assert set_nix_conf(text, {"max-jobs": "8"}) == "cores = 2\nmax-jobs = 8\n# end\n"


def test_keeps_trailing_comment_of_replaced_line():
    text = "max-jobs = 4 # four is plenty\n"
    assert set_nix_conf(text, {"max-jobs": "8"}) == "max-jobs = 8 # four is plenty\n"


def test_commented_out_setting_is_not_a_setting():
    text = "# max-jobs = 4\n"
    assert set_nix_conf(text, {"max-jobs": "8"}) == "# max-jobs = 4\nmax-jobs = 8\n"


def test_similar_keys_untouched():
    text = "build-max-jobs = 3\nmax-jobs-x = 1\nmax-jobs=2\n"
    # `max-jobs=2` is no setting to Nix (it needs ` = `): left as it is.
    assert set_nix_conf(text, {"max-jobs": "8"}) == text + "max-jobs = 8\n"


def test_empty_and_missing_final_newline():
    assert set_nix_conf("", {"a": "1", "b": ""}) == "a = 1\nb =\n"
    assert set_nix_conf("x = 1", {"a": "1"}) == "x = 1\na = 1\n"
    assert set_nix_conf("x = 1\n\n", {"a": "1"}) == "x = 1\n\na = 1\n"


def test_indented_and_tab_separated_lines_replaced():
    assert set_nix_conf("  max-jobs\t=\t2\n", {"max-jobs": "8"}) == "max-jobs = 8\n"


@pytest.mark.parametrize(
    "text",
    [
        "",
        DEBIAN_NIX_CONF,
        "max-jobs = 1\nmax-jobs = 2 # two\nextra-platforms = i686-linux\n",
        "include /etc/nix/other.conf\n!include maybe.conf\nsubstituters =\n",
    ],
)
def test_idempotent(text):
    settings = {"max-jobs": "8", "extra-platforms": "aarch64-linux", "sandbox": "false"}
    once = set_nix_conf(text, settings)
    assert set_nix_conf(once, settings) == once


@pytest.mark.parametrize(
    "value",
    [
        "8\nallowed-users = *",
        "8 # trailing",
        "8\r",
        "8\0",
    ],
)
def test_hostile_values_rejected(value):
    with pytest.raises(ValueError, match="cannot hold"):
        set_nix_conf("", {"max-jobs": value})


@pytest.mark.parametrize("key", ["", "max jobs", "a=b", "#x", "k\n"])
def test_hostile_keys_rejected(key):
    with pytest.raises(ValueError, match=r"not a nix\.conf setting name"):
        set_nix_conf("", {key: "1"})


def test_shell_metacharacters_are_just_text():
    # nix.conf is uploaded as a file, never through a shell: `;` and `$(...)` are plain text.
    assert set_nix_conf("", {"extra-platforms": "aarch64-linux; $(whoami)"}) == (
        "extra-platforms = aarch64-linux; $(whoami)\n"
    )


# Pure: what a builder wants


def test_wanted_seeds_extra_platforms_from_nix_default():
    assert wanted_nix_settings(DEBIAN_NIX_CONF, CONFIG, ["aarch64-linux"], 8) == {
        "extra-platforms": f"{DEFAULT_PLATFORMS} aarch64-linux",
        "max-jobs": "8",
    }


def test_wanted_merges_existing_line_keeping_order():
    text = "extra-platforms = riscv64-linux aarch64-linux\n"
    wanted = wanted_nix_settings(text, CONFIG, ["aarch64-linux", "armv7l-linux"], 2)
    assert wanted["extra-platforms"] == "riscv64-linux aarch64-linux armv7l-linux"


def test_wanted_sandbox_paths_when_sandbox_on():
    config = {**CONFIG, "sandbox": True}
    text = "extra-sandbox-paths = /bin/sh\n"
    wanted = wanted_nix_settings(text, config, ["aarch64-linux", "armv7l-linux"], 8)
    assert wanted["extra-sandbox-paths"] == (
        "/bin/sh "
        "/usr/libexec/qemu-binfmt/aarch64-binfmt-P=/usr/bin/qemu-aarch64-static "
        "/usr/libexec/qemu-binfmt/arm-binfmt-P=/usr/bin/qemu-arm-static"
    )
    relaxed = wanted_nix_settings("", {**CONFIG, "sandbox": "relaxed"}, ["aarch64-linux"], 8)
    assert "extra-sandbox-paths" in relaxed


# Pure: facts


def test_nix_config_process_recorded_sample():
    assert CONFIG["sandbox"] is False
    assert CONFIG["max-jobs"] == 1
    assert CONFIG["extra-platforms"] == DEFAULT_PLATFORMS.split()
    assert NixConfig().requires_command() == "nix"
    assert NixConfig().command() == (
        "nix --extra-experimental-features nix-command --option access-tokens '' show-config --json"
    )


def test_nix_config_never_prints_an_access_token(tmp_path):
    # The fact's own command, run by the machine's Nix with a token in its settings: what
    # pyinfra receives (and prints with -vvv / --debug-facts) holds no token.
    import os
    import subprocess

    env = {**os.environ, "NIX_CONFIG": "access-tokens = github.com=ghp_S3CRET0123456789"}
    printed = subprocess.run(
        ["sh", "-c", NixConfig().command()], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "ghp_S3CRET" not in printed
    config = NixConfig().process(printed.splitlines())
    assert "access-tokens" not in config and config["sandbox"] in (True, False)
    unfiltered = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "show-config", "--json"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert "ghp_S3CRET" in unfiltered  # the setting was there to leak


def test_nix_conf_text_round_trips_exact_bytes():
    text = "a = 1  \n# ü\nno final newline"
    encoded = base64.encodebytes(text.encode()).decode().splitlines()
    assert NixConfText().process(["nixpush: file", *encoded]) == text
    assert NixConfText().process(["nixpush: file"]) == ""
    assert NixConfText().process([]) is None


def test_nix_conf_text_command_quotes_path():
    assert NixConfText().command(path="/etc/nix/x; whoami").get_raw_value() == (
        "if [ -f '/etc/nix/x; whoami' ]; then echo 'nixpush: file' "
        "&& base64 '/etc/nix/x; whoami' ; fi || true"
    )


# Operations with faked facts


def debian_builder(text: str | None, config=CONFIG, systemd: bool = False) -> FakeHost:
    return nix_host("nas", text, config, systemd=systemd)


WAIT = (
    "i=0; until nix --extra-experimental-features nix-command store ping --store daemon "
    ">/dev/null 2>&1; do i=$((i+1)); if [ $i -ge 100 ]; then echo 'nix-daemon does not answer "
    "on /nix/var/nix/daemon-socket/socket' >&2; exit 1; fi; sleep 0.1; done"
)
# Stops only the listener (its pid from the listening socket), not the workers serving builds.
STOP_LISTENER = (
    "pids=$(ss -xlpnH src /nix/var/nix/daemon-socket/socket | grep -o 'pid=[0-9]*' | "
    'cut -d= -f2); if [ -n "$pids" ]; then kill $pids; i=0; while kill -0 $pids 2>/dev/null; '
    'do i=$((i+1)); if [ $i -ge 50 ]; then echo "nix-daemon $pids does not exit" >&2; exit 1; '
    "fi; sleep 0.1; done; fi"
)


def test_nix_settings_already_right_is_a_noop():
    text = DEBIAN_NIX_CONF + f"extra-platforms = {DEFAULT_PLATFORMS} aarch64-linux\nmax-jobs = 8\n"
    host = debian_builder(text)
    assert run(host, nix_settings, ["aarch64-linux"], 8) == []
    assert host.noops == ["/etc/nix/nix.conf already sets extra-platforms, max-jobs"]


REPLACE = (
    "umask 022 && mkdir -p -- /etc/nix && umask 077 && rm -f -- /etc/nix/.nix.conf.nixpush-?????? "
    '&& tmp=$(mktemp /etc/nix/.nix.conf.nixpush-XXXXXX ) && { base64 -d > "$tmp" && '
    'if [ -e /etc/nix/nix.conf ]; then chown --reference /etc/nix/nix.conf "$tmp" && '
    'chmod --reference /etc/nix/nix.conf "$tmp"; else chmod 0644 "$tmp"; fi && sync -- "$tmp" '
    "&& { if [ -e /etc/nix/nix.conf ]; then ln -fT /etc/nix/nix.conf "
    "/etc/nix/nix.conf.nixpush-previous ; else rm -f -- /etc/nix/nix.conf.nixpush-previous ; "
    'fi; } && mv -fT "$tmp" /etc/nix/nix.conf || { rm -f "$tmp"; exit 1; }; }'
)


def test_nix_settings_replaces_nix_conf_atomically_then_restarts_or_restores():
    host = debian_builder(DEBIAN_NIX_CONF)
    commands = run(host, nix_settings, ["aarch64-linux"], 8)
    assert shell(commands) == [REPLACE, f"_restart_or_restore: {NIX_CONF}"]
    assert written(commands[0]) == (
        DEBIAN_NIX_CONF + f"extra-platforms = {DEFAULT_PLATFORMS} aarch64-linux\nmax-jobs = 8\n"
    )
    assert commands[1].args == (NIX_CONF, False, False)  # nix.conf, systemd, sudo


def test_restart_without_systemd_stops_the_listener_and_starts_one_detached():
    assert restart_daemon(systemd=False).get_raw_value() == (
        f"{{ {STOP_LISTENER} ; }} && {{ setsid nix-daemon </dev/null >/dev/null 2>&1 & }} "
        f"&& {{ {WAIT} ; }}"
    )


def test_restart_with_systemd():
    assert restart_daemon(systemd=True).get_raw_value() == (
        f"systemctl restart nix-daemon.service && {{ {WAIT} ; }}"
    )


def test_nix_settings_without_max_jobs_leaves_it():
    host = debian_builder(DEBIAN_NIX_CONF + "max-jobs = 3 # mine\n")
    commands = run(host, nix_settings, ["aarch64-linux"])
    assert written(commands[0]) == (
        DEBIAN_NIX_CONF
        + f"max-jobs = 3 # mine\nextra-platforms = {DEFAULT_PLATFORMS} aarch64-linux\n"
    )


def test_nix_settings_with_nothing_to_set_is_a_noop():
    host = debian_builder(DEBIAN_NIX_CONF)
    assert run(host, nix_settings, []) == []
    assert host.noops == ["no emulated systems and no max-jobs to set in /etc/nix/nix.conf"]


def test_wanted_without_systems_or_max_jobs_leaves_lines_alone():
    assert wanted_nix_settings(DEBIAN_NIX_CONF, CONFIG, [], None) == {}
    assert wanted_nix_settings(DEBIAN_NIX_CONF, CONFIG, [], 4) == {"max-jobs": "4"}


def test_restart_nix_daemon_is_not_idempotent():
    assert restart_nix_daemon._inner.is_idempotent is False


def test_nix_settings_missing_nix_fails_host():
    host = debian_builder(None, config=None)
    assert failure(host, nix_settings, ["aarch64-linux"], 8) == "nas: nix is not installed"


def test_nix_settings_rejects_bad_input():
    host = debian_builder(DEBIAN_NIX_CONF)
    with pytest.raises(OperationError, match="unknown Nix system 'aarch64-linux; whoami'"):
        run(host, nix_settings, ["aarch64-linux; whoami"], 8)
    with pytest.raises(OperationError, match="nix_max_jobs must be a whole number"):
        run(host, nix_settings, ["aarch64-linux"], "8; whoami")
    host.fact(User, "beau")
    with pytest.raises(OperationError, match="connected as 'beau', not root"):
        run(host, nix_settings, ["aarch64-linux"], 8)
    # Sudo to another user is not root either: the host is asked.
    host.current_op_global_arguments = {"_sudo": True, "_sudo_user": "beau"}
    with pytest.raises(OperationError, match="connected as 'beau', not root"):
        run(host, nix_settings, ["aarch64-linux"], 8)


def test_plain_sudo_is_root_without_asking_the_host():
    host = debian_builder(DEBIAN_NIX_CONF)
    host.fact(User, "beau")  # what the login user is: never asked
    host.current_op_global_arguments = {"_sudo": True}
    run(host, nix_settings, ["aarch64-linux"], 8)


def nixos_builder(config) -> FakeHost:
    return nix_host("nas", None, config, nixos=True)


def test_nixos_already_right_is_a_noop():
    config = {**CONFIG, "extra-platforms": ["aarch64-linux"], "max-jobs": 8}
    host = nixos_builder(config)
    assert run(host, nix_settings, ["aarch64-linux"], 8) == []
    assert host.noops == [
        "nas runs NixOS and its Nix already builds aarch64-linux with max-jobs = 8"
    ]


def test_nixos_missing_settings_fails_with_the_options():
    host = nixos_builder(CONFIG)
    assert failure(host, nix_settings, ["aarch64-linux"], 8) == (
        'nas runs NixOS: set boot.binfmt.emulatedSystems = [ "aarch64-linux" ]; and '
        "nix.settings.max-jobs = 8; in its configuration, then rebuild it"
        f" {FRAGMENT_HINT}"
    )


def test_recorded_sample_is_real_json():
    assert set(json.loads(SHOW_CONFIG)) >= {"sandbox", "max-jobs", "extra-platforms"}
    assert nix.NIX_CONF == "/etc/nix/nix.conf"


def test_a_daemon_that_does_not_answer_gets_the_previous_nix_conf_back(monkeypatch):
    calls = []
    answers = iter([(False, ["nix-daemon does not answer on /nix/var/nix/daemon-socket/socket"]),
                    (True, [])])  # fmt: skip

    def run_on(host, command, *, doing, sudo):
        calls.append((command.get_raw_value(), doing, sudo))
        return next(answers)

    monkeypatch.setattr(nix, "run_on", run_on)
    restart_or_restore = nix._restart_or_restore.__wrapped__
    with pytest.raises(nix.DeployFailed) as failed:
        restart_or_restore(None, FakeHost("nas"), NIX_CONF, False, True)
    assert str(failed.value) == (
        "nas: nix-daemon did not answer after /etc/nix/nix.conf changed (nix-daemon does not "
        "answer on /nix/var/nix/daemon-socket/socket); the previous /etc/nix/nix.conf is back "
        "and the daemon answers again; check the new settings with `nix show-config`, and the "
        "daemon's log"
    )
    restore, doing, sudo = calls[1]
    assert restore.startswith(
        "if [ -e /etc/nix/nix.conf.nixpush-previous ]; then mv -fT "
        "/etc/nix/nix.conf.nixpush-previous /etc/nix/nix.conf ; else rm -f -- /etc/nix/nix.conf"
    )
    assert restore.endswith(restart_daemon(systemd=False).get_raw_value())
    assert (doing, sudo) == ("restoring /etc/nix/nix.conf", True)


def test_an_answering_daemon_drops_the_backup(monkeypatch):
    calls = []
    monkeypatch.setattr(
        nix, "run_on", lambda host, c, **kw: calls.append(c.get_raw_value()) or (True, [])
    )
    assert nix._restart_or_restore.__wrapped__(None, FakeHost("nas"), NIX_CONF, True, False)
    assert calls == [
        restart_daemon(systemd=True).get_raw_value(),
        "rm -f -- /etc/nix/nix.conf.nixpush-previous",
    ]
