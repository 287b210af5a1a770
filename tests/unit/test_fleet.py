"""The data contract's checks, on small inventories loaded the way the pyinfra CLI loads them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from operations.core.models import Action, Safety
from operations.data.fleet import (
    FleetError,
    HostSpec,
    builders,
    check_fleet,
    fleet_errors,
    host_spec,
)
from operations.data.schedule import Schedule
from tests.unit.conftest import REPO

# Every host nixpush connects to checks host keys (unset is pyinfra's accept-new: refused).
STRICT = {"ssh_strict_host_key_checking": "yes"}
NAS_DATA = {"nix_system": "x86_64-linux", "binfmt_emulated_systems": ["aarch64-linux"], **STRICT}
PI_DATA = {
    "nix_system": "aarch64-linux",
    "builder_host": "nas",
    "ssh_hostname": "pi.test",
    **STRICT,
}


def fleet(nas=None, pi=None):
    """A sound two-host fleet (a builder and a Pi it builds for); data overrides, None deletes."""

    def merged(data, overrides):
        return {k: v for k, v in {**data, **(overrides or {})}.items() if v is not None}

    nas_member = ("nas", merged(NAS_DATA, nas))
    pi_member = ("pi", merged(PI_DATA, pi))
    return {"minimal": [nas_member, pi_member], "server": [nas_member]}


def only_problem(inventory):
    problems = fleet_errors(inventory)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize("filename", ["inventory.py", "staging.py"])
def test_sound_fleet_passes(write_inventory, filename):
    # The inventory file's own group ("inventory", "staging") is not a root and is no problem.
    inventory = write_inventory(fleet(), filename=filename)
    assert fleet_errors(inventory) == []
    specs = check_fleet(inventory)
    assert specs["pi"].builder_host == "nas"
    assert builders(specs) == ["nas"]


def test_group_that_is_not_a_root(write_inventory):
    groups = fleet()
    groups["sever"] = groups.pop("server")
    problem = only_problem(write_inventory(groups))
    assert problem.startswith("nas: group 'sever' is not a root;")
    assert "move the host into one of the roots: minimal, common," in problem


def test_group_that_is_not_a_root_in_a_one_host_inventory(write_inventory):
    # The mistyped group holds every host here, like the file group does; still caught.
    problem = only_problem(write_inventory({"comon": [("nas", NAS_DATA)]}))
    assert problem.startswith("nas: group 'comon' is not a root;")


def test_unknown_nix_system(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"nix_system": "aarch64-linus"})))
    assert problem.startswith("pi: nix_system 'aarch64-linus' is unknown;")
    assert "set it to one of: x86_64-linux," in problem


def test_missing_nix_system(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"nix_system": None})))
    assert problem.startswith("pi: nix_system is missing;")
    assert "aarch64-linux" in problem


def test_unknown_binfmt_emulated_system(write_inventory):
    inventory = write_inventory(fleet(nas={"binfmt_emulated_systems": ["aarch64-linux", "arm"]}))
    problem = only_problem(inventory)
    assert problem.startswith("nas: binfmt_emulated_systems has unknown system 'arm';")
    assert "armv7l-linux" in problem


def test_builder_host_not_in_inventory(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"builder_host": "nsa"})))
    assert problem == (
        "pi: builder_host 'nsa' is not in the inventory; set builder_host to one of: nas"
    )


def test_builder_host_naming_itself_builds_itself(write_inventory):
    # The NAS deploying itself: evaluated and built there, nothing pushed.
    specs = check_fleet(write_inventory(fleet(nas={"builder_host": "nas", "ssh_hostname": "n"})))
    assert specs["nas"].is_target and specs["nas"].builds_itself
    assert specs["nas"].pushed_by is None
    assert specs["pi"].pushed_by == "nas" and not specs["pi"].builds_itself


def test_builder_that_cannot_build_the_target_system(write_inventory):
    problem = only_problem(write_inventory(fleet(nas={"binfmt_emulated_systems": []})))
    assert problem.startswith("pi: builder_host 'nas' cannot build nix_system 'aarch64-linux'")
    assert "add 'aarch64-linux' to nas's binfmt_emulated_systems" in problem
    assert "run deploys/nas.py" in problem


def test_builder_systems_come_from_group_data(write_inventory):
    # The server root's group data makes nas able to build for the Pi.
    inventory = write_inventory(
        fleet(nas={"binfmt_emulated_systems": None}),
        group_data={"server": 'binfmt_emulated_systems = ["aarch64-linux"]\n'},
    )
    assert fleet_errors(inventory) == []
    assert host_spec(inventory.get_host("nas")).builder_systems == (
        "x86_64-linux",
        "i686-linux",
        "aarch64-linux",
    )


def test_target_without_ssh_hostname(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"ssh_hostname": None})))
    assert problem.startswith("pi: ssh_hostname is missing, so builder 'nas' has no address")
    assert "set ssh_hostname" in problem


def test_bad_deploy_action(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"deploy_action": "swtich"})))
    assert problem.startswith("pi: deploy_action 'swtich' is not an action;")
    assert "set it to one of: switch, boot, test, dry-activate, build" in problem


@pytest.mark.parametrize("value", ["lots", -2, 2.5, True, "8 jobs"])
def test_bad_nix_max_jobs(write_inventory, value):
    # 0 is a builder that builds nothing itself: only with a pool (tests/unit/test_pool.py).
    problem = only_problem(write_inventory(fleet(nas={"nix_max_jobs": value})))
    assert problem.startswith(f"nas: nix_max_jobs is {value!r};")
    assert "set it to a whole number of 0 or more" in problem


@pytest.mark.parametrize(("key", "value"), [("ssh_port", 0), ("builder_port", "70000")])
def test_bad_ports(write_inventory, key, value):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem.startswith(f"pi: {key} is {value!r};")
    assert "set it to a whole number from 1 to 65535" in problem


def test_data_override_strings_are_coerced(write_inventory):
    # --data (or any caller) may hand over numbers as strings; they win over group data.
    inventory = write_inventory(
        fleet(),
        group_data={"server": "nix_max_jobs = 2\n"},
        override_data={"nix_max_jobs": "8", "ssh_port": " 8023 "},
    )
    assert fleet_errors(inventory) == []
    assert host_spec(inventory.get_host("nas")).nix_max_jobs == 8
    assert host_spec(inventory.get_host("pi")).ssh_port == 8023


def test_host_spec_raises_for_its_own_problems(write_inventory):
    inventory = write_inventory(fleet(pi={"nix_system": None, "deploy_action": "reboot"}))
    with pytest.raises(FleetError) as caught:
        host_spec(inventory.get_host("pi"))
    assert [problem.split(" ")[1] for problem in caught.value.problems] == [
        "nix_system",
        "deploy_action",
    ]


def test_check_fleet_lists_every_problem_one_per_line(write_inventory):
    inventory = write_inventory(fleet(nas={"nix_max_jobs": "many"}, pi={"builder_host": "nsa"}))
    with pytest.raises(FleetError) as caught:
        check_fleet(inventory)
    lines = str(caught.value).splitlines()
    assert lines[0] == "the inventory has 2 problems:"
    assert sorted(line.strip().split(":")[0] for line in lines[1:]) == ["nas", "pi"]
    assert str(caught.value) == caught.value.message


def test_defaults():
    spec = HostSpec(name="pi", nix_system="aarch64-linux", nixos_config="pi")
    assert (spec.ssh_port, spec.deploy_action, spec.is_target) == (22, "switch", False)
    assert spec.builder_systems == ("aarch64-linux",)


def test_builders_include_emulating_hosts_nobody_names_yet():
    specs = {
        "nas": HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas"),
        "spare": HostSpec(
            name="spare",
            nix_system="x86_64-linux",
            nixos_config="spare",
            binfmt_emulated_systems=("armv7l-linux",),
        ),
        "pi": HostSpec(
            name="pi", nix_system="aarch64-linux", nixos_config="pi", builder_host="nas"
        ),
    }
    assert builders(specs) == ["nas", "spare"]


def test_cli_prints_fleet_error_as_a_message_not_a_traceback(tmp_path):
    # A real `pyinfra` run against @local whose deploy file only calls check_fleet: nothing is
    # executed on the machine, it shows how a user sees the error.
    (tmp_path / "inventory.py").write_text(
        'minimal = [("@local", {"nix_system": "x86_64-linux", "builder_host": "nsa"})]\n'
    )
    (tmp_path / "deploy.py").write_text(
        "from pyinfra import state\n"
        "from operations.data.fleet import check_fleet\n"
        "check_fleet(state.inventory)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pyinfra", "inventory.py", "deploy.py", "-y"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 1
    assert "--> pyinfra error in " in run.stderr
    assert "the inventory has 2 problems:" in run.stderr
    assert "  @local: builder_host 'nsa' is not in the inventory;" in run.stderr
    assert "Traceback" not in run.stderr


# Refusals: builders, addresses, references, keys and misspelt data


HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDhT8yrRU+3V2oxL5d3S9E2gDxNgUOsLCs8D3Zc5Lz+x"


def test_builder_cycle(write_inventory):
    groups = fleet(nas={"builder_host": "pi", "nix_system": "x86_64-linux"})
    problems = fleet_errors(write_inventory(groups))
    assert (
        "pi: builder_host 'nas' has builder_host 'pi': two hosts that build each other are "
        "never built; set one's builder_host to a host that builds its own system, or remove it"
    ) in problems
    assert any(p.startswith("nas: builder_host 'pi' has builder_host 'nas'") for p in problems)


def test_builder_chain(write_inventory):
    groups = fleet()
    mid = ("mid", {**PI_DATA, "ssh_hostname": "mid"})
    groups["minimal"].append(mid)
    groups["minimal"][1] = ("pi", {**PI_DATA, "builder_host": "mid"})
    problem = only_problem(write_inventory(groups))
    assert problem == (
        "pi: builder_host 'mid' is itself built on 'nas', a chain nixpush does not follow; set "
        "pi's builder_host to a host without builder_host (e.g. 'nas'), or remove mid's"
    )


def test_two_targets_at_one_address(write_inventory):
    groups = fleet(pi={"ssh_port": 8023})
    groups["minimal"].append(("pi2", {**PI_DATA, "ssh_hostname": "PI.test", "ssh_port": 8023}))
    problem = only_problem(write_inventory(groups))
    assert problem == (
        "pi2: ssh_hostname and ssh_port PI.test:8023 are also pi's, and the builder's known_hosts "
        "holds one host key per address; give each target its own address or port"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("ssh_hostname", "pi test"), ("ssh_hostname", "beau@pi"), ("ssh_hostname", "-oProxyCommand=x"),
     ("ssh_user", "-oX"), ("ssh_user", "be au"), ("ssh_user", "a@b")],
)  # fmt: skip
def test_addresses_and_users_that_would_be_options_or_two_words(write_inventory, key, value):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem.startswith(f"pi: {key} {value!r} has whitespace, '@' or a leading '-'; set")


@pytest.mark.parametrize("address", ["fe80::1", "[2001:db8::2]"])
def test_ipv6_targets_are_refused_clearly(write_inventory, address):
    problem = only_problem(write_inventory(fleet(pi={"ssh_hostname": address})))
    assert problem == (
        f"pi: ssh_hostname {address!r} is an IPv6 address, which nixpush does not support "
        "(Nix's ssh-ng URLs and known_hosts need it bracketed); use a DNS name or an IPv4 address"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("flake", "path:/x y"), ("flake", "-L"), ("flake", "path:/x#pi"), ("flake", 'a"b'),
     ("nixos_config", "pi#x"), ("nixos_config", "-pi"), ("nixos_config", "p i")],
)  # fmt: skip
def test_flake_references_nixpush_could_not_glue_safely(write_inventory, key, value):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem.startswith(f"pi: {key} {value!r} has whitespace, a leading '-', '#' or '\"';")


def test_empty_deploy_action_is_not_switch(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"deploy_action": ""})))
    assert problem == (
        "pi: deploy_action is empty; leave it out for switch, or set one of: switch, boot, "
        "test, dry-activate, build, rollback"
    )


@pytest.mark.parametrize(
    "key",
    ["ssh-ed25519", "ssh-ed25519 AAAA", "nope AAAAC3NzaC1lZDI1NTE5",
     f"ssh-rsa {HOST_KEY.split()[1]}", "[1.2.3.4]:22 " + HOST_KEY],
)  # fmt: skip
def test_malformed_ssh_host_key(write_inventory, key):
    problem = only_problem(write_inventory(fleet(pi={"ssh_host_key": key})))
    assert problem.startswith(f"pi: ssh_host_key {key!r} is not an SSH public key")


def test_a_real_host_key_with_a_comment_passes(write_inventory):
    assert fleet_errors(write_inventory(fleet(pi={"ssh_host_key": f"{HOST_KEY} root@pi"}))) == []


@pytest.mark.parametrize("user", ["root", "nix ssh", "-x", "nix;ssh"])
def test_builder_user_root_or_not_an_account(write_inventory, user):
    problem = only_problem(write_inventory(fleet(pi={"builder_user": user})))
    assert problem.startswith(f"pi: builder_user {user!r} is not a dedicated account name;")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("builder_hots", "builder_host"), ("nix_sytem", "nix_system"), ("flakes", "flake"),
     ("ssh_hostnme", "ssh_hostname"), ("max_ssh_session", "max_ssh_sessions"),
     ("helth_checks", "health_checks"), ("secret", "secrets")],
)  # fmt: skip
def test_misspelt_keys_name_the_key_they_resemble(write_inventory, typo, meant):
    problems = fleet_errors(write_inventory(fleet(pi={typo: "x"})))
    assert (
        f"pi: {typo} is not a nixpush or pyinfra data key; did you mean {meant}? Rename it "
        f"(or, if it is your own, give it a name less like {meant})"
    ) in problems


@pytest.mark.parametrize(
    "key", ["owner_email", "location", "ssh_password", "ssh_config_file", "_sudo", "_sudo_user",
            "docker_identifier", "rollback", "image_dest", "offline_ok"],
)  # fmt: skip
def test_own_and_pyinfra_keys_are_not_refused(write_inventory, key):
    # Never taken for a misspelling (a key's own value checks may still refuse "x").
    problems = fleet_errors(write_inventory(fleet(pi={key: "x"})))
    assert not [problem for problem in problems if "did you mean" in problem]


@pytest.mark.parametrize("value", ["no", "accept-new", "off"])
def test_unchecked_host_keys_on_targets_and_builders(write_inventory, value):
    inventory = write_inventory(fleet(pi={"ssh_strict_host_key_checking": value}))
    assert only_problem(inventory) == (
        f"pi: ssh_strict_host_key_checking is {value!r}, so an impostor could take this host's "
        'place when nixpush connects to it; set it to "yes" (the host\'s key in its known_hosts '
        "file, or pinned from its ssh_host_key by operations.trust.hostkeys.pin_host_keys in the "
        "inventory), or set insecure_ssh_host_key_checking = True to accept that"
    )
    allowed = {"ssh_strict_host_key_checking": value, "insecure_ssh_host_key_checking": True}
    inventory = write_inventory(fleet(nas=allowed, pi=allowed), filename="allowed.py")
    assert fleet_errors(inventory) == []


# -- what the activation and the schedule read: parsed here, once, for every host --------


def test_safety_health_checks_schedule_and_sudo_defaults(write_inventory):
    spec = check_fleet(write_inventory(fleet()))["pi"]
    assert (spec.sudo, spec.rollback, spec.confirm_timeout, spec.activation_timeout) == (
        False, True, 30, 600,
    )  # fmt: skip
    assert spec.health_checks == () and spec.schedule == Schedule(enabled=False)
    assert spec.safety(Action.SWITCH) == Safety(True, 30, 600)
    assert spec.safety(Action.BOOT).rollback is False  # nothing is confirmed without a reboot


def test_safety_health_checks_schedule_and_sudo_are_typed(write_inventory):
    data = {
        "_sudo": True,
        "rollback": "false",
        "confirm_timeout": "12",
        "activation_timeout": 90,
        "health_checks": {"name": "sshd", "units": "sshd.service"},
        "schedule": {"enabled": False, "activate": False},
    }
    spec = check_fleet(write_inventory(fleet(pi=data)))["pi"]
    assert spec.sudo is True
    assert spec.safety(Action.TEST) == Safety(False, 12, 90)
    assert [(c.name, c.units) for c in spec.health_checks] == [("sshd", ("sshd.service",))]
    assert spec.schedule == Schedule(enabled=False, activate=False)


def test_bad_safety_checks_schedule_and_sudo_stop_every_deploy_at_its_start(write_inventory):
    data = {
        "_sudo": "yes",
        "rollback": "maybe",
        "confirm_timeout": 0,
        "activation_timeout": 86401,
        "health_checks": [{"name": "web", "url": "ftp://x/"}],
        "schedule": {"enabled": True, "checkout": "relative", "program": "/p"},
    }
    with pytest.raises(FleetError) as error:
        check_fleet(write_inventory(fleet(pi=data)))
    assert error.value.problems == (
        "pi: _sudo is 'yes'; set it to True or False",
        "pi: rollback is 'maybe'; set it to True or False",
        "pi: confirm_timeout is 0; set it to a number of seconds from 1 to 86400",
        "pi: activation_timeout is 86401; set it to a number of seconds from 1 to 86400",
        "pi: health_checks[0] in host data url is 'ftp://x/'; set it to an http(s) URL like "
        '"http://127.0.0.1/"',
        "pi: schedule runs must map a mode (check, deploy) to {'on_calendar': ..., "
        "'randomized_delay': ...}",
    )


def _reboot_of(data):
    from operations.data.reboot import parse_reboot

    problems: list[str] = []
    parsed = parse_reboot(data.get, lambda key, text: problems.append(f"{key} {text}"))
    return parsed, problems


def test_reboot_data_defaults_to_never_and_the_real_command():
    from operations.data.reboot import Reboot, RebootPolicy

    assert _reboot_of({}) == (Reboot(), [])
    assert Reboot().command == ("systemctl", "reboot")
    assert Reboot().policy is RebootPolicy.NEVER and not Reboot().wanted(True)
    assert Reboot(RebootPolicy.WHEN_NEEDED).wanted(True)
    assert not Reboot(RebootPolicy.WHEN_NEEDED).wanted(False)
    assert Reboot(RebootPolicy.ALWAYS).wanted(False)


def test_reboot_command_is_a_list_of_words_kept_apart():
    parsed, problems = _reboot_of({"reboot_command": ["sh", "/x/bench-reboot; whoami"]})
    assert parsed.command == ("sh", "/x/bench-reboot; whoami") and problems == []
    for bad in ("systemctl reboot", [], ["a\nb"], [""], [1]):
        parsed, problems = _reboot_of({"reboot_command": bad})
        assert parsed.command == ("systemctl", "reboot")
        assert problems == [
            f"reboot_command is {bad!r}; set it to the command as a list of words, "
            "e.g. ['systemctl', 'reboot']"
        ]


def test_bench_hosts_reboot_with_the_stand_in_and_start_without_cap_sys_boot():
    from tests.bench import fleet as bench
    from tests.bench.inventory import _data

    pi4 = bench.host("pi4")
    assert _data(pi4)["reboot_command"] == [str(bench.REBOOT_STAND_IN)]
    launch = bench._launch_script(pi4)
    assert "unshare --mount --uts --pid --fork --mount-proc" in launch
    assert bench.REBOOT_REQUEST in launch
    assert bench.launcher_argv(pi4)[4:7] == ["setpriv", "--bounding-set", "-sys_boot"]
    guards = bench.host_guards(pi4)
    assert "boot.sh" in guards and "/proc/sysrq-trigger" in guards
