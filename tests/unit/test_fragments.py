"""Nix values and fragments: escaping (hostile values stay data), the unit-file round trip, and
valid Nix (``nix-instantiate --parse``, ``nix eval`` against a stub module) without a bench."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from operations.builder import timers
from operations.core.nixexpr import Attr, Raw, nix_binding, nix_string, nix_value
from operations.data.fleet import FleetError, HostSpec, check_fleet
from operations.data.schedule import parse_schedule
from operations.nixos import checks as nixos_checks
from operations.nixos import fragments
from operations.trust.keys import BuilderTrust
from tests.bench import nixos
from tests.shared import shared_candidates
from tests.unit.conftest import REPO, load_inventory

NIX = shutil.which("nix-instantiate")
HOSTILE = 'a"b\\c${builtins.abort "x"}\n\'\'${x}'
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNixpushTestKeyBlobAAAAAAAAAAAAAAAAAAAAAA"
NIX_KEY = "nas-nixpush-1:" + "A" * 43 + "="
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyBlobBBBBBBBBBBBBBBBBBBBBBBBBBBB"
SCHEDULE = parse_schedule(
    "nas",
    {
        "enabled": True,
        "checkout": "/home/beau/nixpush",
        "program": "/home/beau/nixpush/.venv/bin/nixpush-run",
        "user": "beau",
        "age_key_file": "/home/beau/.config/sops/age/keys.txt",
        "runs": {"check": {"on_calendar": "hourly", "randomized_delay": "10min"}},
    },
)


def test_strings_escape_quotes_backslashes_and_interpolation():
    assert nix_string(HOSTILE) == '"a\\"b\\\\c\\${builtins.abort \\"x\\"}\\n\'\'\\${x}"'
    assert nix_value({"users.users": {Attr("my user"): True}}) == (
        '{ users.users = { "my user" = true; }; }'
    )
    assert nix_value({("a", "b.c", "if"): [1, None, Raw("pkgs.git")]}) == (
        '{ a."b.c"."if" = [ 1 null pkgs.git ]; }'
    )
    with pytest.raises(ValueError):
        Raw("pkgs.git; builtins.abort")


def test_unit_files_round_trip_into_nixos_options():
    units = timers.unit_files(SCHEDULE)
    options = fragments.schedule_options(units, SCHEDULE.program)
    service = options[("systemd", "services", "nixpush-check")]
    timer = options[("systemd", "timers", "nixpush-check")]
    assert service["serviceConfig"]["User"] == "beau"
    assert service["serviceConfig"]["SuccessExitStatus"] == "2 75"
    # nixpush from nixpkgs' Python and sops, never the virtualenv's program.
    assert service["path"] == [
        Raw("nixpushPython"),
        Raw("pkgs.sops"),
        Raw("pkgs.openssh"),
        Raw("pkgs.git"),
    ]
    exec_start = nix_value(service["serviceConfig"]["ExecStart"])
    assert exec_start.startswith(
        '"\\"${nixpushPython}/bin/python\\" \\"-m\\" \\"operations.run.runner\\" \\"check\\"'
    )
    assert ".venv" not in exec_start
    assert timer["wantedBy"] == ["timers.target"]
    assert timer["timerConfig"]["OnCalendar"] == "hourly"
    assert "Install" not in timer


def _write_env(directory: Path) -> None:
    """The environment beside fragments written in ``directory``, as the deploy writes it."""
    (directory / fragments.ENV_FILE).parent.mkdir(parents=True, exist_ok=True)
    (directory / fragments.ENV_FILE).write_text(fragments.ENV_EXPRESSION)


def _fragment(value: str = "aarch64-linux") -> fragments.Fragment:
    nas = HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas",
                   binfmt_emulated_systems=(value,), nix_max_jobs=8)  # fmt: skip
    pi = HostSpec(name="pi4", nix_system="aarch64-linux", nixos_config="pi4", builder_host="nas",
                  ssh_user="beau", ssh_hostname="192.168.1.122", ssh_port=8023)  # fmt: skip
    sections = [
        *fragments.builder_sections(nas, {"nix-ssh": [f"{SSH_KEY} nixpush-pull:pi4"]},
                                    timers.unit_files(SCHEDULE), SCHEDULE.program),
        *fragments.target_sections(pi, SSH_KEY, NIX_KEY, {"programs.ssh.extraConfig": HOSTILE}),
    ]  # fmt: skip
    return fragments.Fragment("nas", tuple(sections))


@pytest.mark.skipif(NIX is None, reason="no Nix here")
def test_a_fragment_parses_and_evaluates_against_a_stub_module(tmp_path: Path):
    path = tmp_path / "nas.nix"
    path.write_text(_fragment().render())
    _write_env(tmp_path)

    parsed = subprocess.run([str(NIX), "--parse", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr

    options = nixos.evaluate(path)
    assert nixos.get(options, "nix.settings.max-jobs") == 8
    assert nixos.get(options, "nix.settings.extra-trusted-public-keys") == [NIX_KEY]
    assert nixos.get(options, "users.users.beau.openssh.authorizedKeys.keys") == [SSH_KEY]
    assert nixos.get(options, "programs.ssh.extraConfig") == HOSTILE  # data, never evaluated
    check = nixos.get(options, "systemd.services.nixpush-check.serviceConfig.ExecStart")
    args = timers.command_line(SCHEDULE, SCHEDULE.runs[0])[1:]
    runner = [f"{nixos.STUB_ENV}/bin/python", *fragments.RUNNER]
    assert check == " ".join(timers.exec_quote(a) for a in [*runner, *args])
    # What deploys/schedule.py and nixos_check.py accept as the running unit's line.
    assert nixos_checks.same_unit_line(
        "ExecStart=" + " ".join(timers.exec_quote(a) for a in [SCHEDULE.program, *args]),
        {f"ExecStart={check}"},
        SCHEDULE.program,
    )


def test_a_multi_line_string_renders_as_an_indented_string():
    text = _fragment().render()
    assert "  programs.ssh.extraConfig = ''\n" not in text  # HOSTILE holds ${: quoted
    multi = nix_value({"x": "Host a\nPort 22\n"}, indent=2)
    assert multi == "{\n  x = ''\n    Host a\n    Port 22\n  '';\n}"


def nixos_eval_check() -> Path | None:
    """``nixos-eval/check`` in the project's shared folder: ``$NIXPUSH_SHARED`` (which
    ``.ci/run`` sets for its clone under /tmp), else ``../shared`` beside the checkout."""
    return next((path for path in shared_candidates("nixos-eval", "check") if path.is_file()), None)


def required_nixos_eval_check() -> Path:
    """The checker; a test needing it fails under CI without it, else is skipped."""
    check = nixos_eval_check()
    if check is None:
        if os.environ.get("CI"):
            pytest.fail("shared/nixos-eval/check is missing: CI must check the fragments")
        pytest.skip("shared/nixos-eval is not beside this checkout")
    return check


def _alerting_fragment(**changes: object) -> fragments.Fragment:
    data = {
        "enabled": True,
        "checkout": "/home/beau/nixpush",
        "program": "/home/beau/nixpush/.venv/bin/nixpush-run",
        "user": "beau",
        "runs": {"check": {"on_calendar": "hourly"}, "deploy": {"on_calendar": "03:30"}},
        "metrics_dir": "/run/nixpush-metrics",
        "on_failure": ["/bin/sh", "-c", 'curl -fsS -T "$1" https://ntfy.sh/beau-nixpush', "sh"],
        "node_exporter": True,
        **changes,
    }
    spec = HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas")
    specs = {"nas": replace(spec, schedule=parse_schedule("nas", data))}
    return fragments.host_fragment(specs, "nas")


def test_the_fragment_wires_metrics_and_on_failure_and_the_node_exporter_when_asked():
    options = _alerting_fragment().options
    node = "services.prometheus.exporters.node"
    assert options[f"{node}.enable"] is True
    assert options[f"{node}.enabledCollectors"] == ["textfile"]
    assert options[f"{node}.extraFlags"] == ["--collector.textfile.directory=/run/nixpush-metrics"]
    service = options[("systemd", "services", "nixpush-deploy")]["serviceConfig"]
    assert service["RuntimeDirectory"] == "nixpush-metrics"
    assert service["RuntimeDirectoryMode"] == "0755"
    exec_start = service["ExecStart"].render()
    assert '\\"--metrics-dir\\" \\"/run/nixpush-metrics\\"' in exec_start
    assert "--on-failure=curl -fsS -T" in exec_start
    unasked = _alerting_fragment(node_exporter=False).options
    assert not [key for key in unasked if "prometheus" in str(key)]


def test_a_fragment_with_metrics_on_failure_and_the_node_exporter_passes_the_nixos_check(
    tmp_path: Path,
):
    for name, fragment in {
        "exporter.nix": _alerting_fragment(),
        "elsewhere.nix": _alerting_fragment(metrics_dir="/var/lib/node-exporter"),
    }.items():
        (tmp_path / name).write_text(fragment.render())
    # The env expression the units import is checked through them.
    _write_env(tmp_path)
    files = [str(tmp_path / "exporter.nix"), str(tmp_path / "elsewhere.nix")]

    result = subprocess.run(
        [str(required_nixos_eval_check()), *files], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


# -- the owner's shipped inventory -------------------------------------------------------


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch) -> dict[str, HostSpec]:
    """The repository's inventory.py and group_data, the builder's keys stand-ins (no sops)."""
    monkeypatch.setattr(fragments, "builder_trust", lambda specs, builder, for_host: BuilderTrust(
        SSH_KEY, NIX_KEY))  # fmt: skip
    return check_fleet(load_inventory(REPO / "inventory.py", REPO))


def test_every_host_nixpush_runs_sudo_on_gets_the_rule_as_root_only(shipped):
    specs = shipped
    rule = {
        "users": ["beau"],
        "runAs": "root",
        "commands": [{"command": "ALL", "options": ["NOPASSWD"]}],
    }
    for name in ("nas", "pi4", "grill", "laptop"):  # the NAS too: it builds and copies
        options = fragments.host_fragment(specs, name).options
        assert options["security.sudo.extraRules"] == [rule], name
    assert not fragments.host_fragment(specs, "iso").sections  # an image: none


def test_a_builder_nixpush_logs_in_to_as_root_gets_no_sudo_rule(write_inventory):
    nas = {
        "nix_system": "x86_64-linux",
        "ssh_user": "root",
        "ssh_strict_host_key_checking": "yes",
        "_sudo": True,
        "binfmt_emulated_systems": ["aarch64-linux"],
    }
    inventory = write_inventory({"server": [("nas", nas)]})
    fragment = fragments.host_fragment(check_fleet(inventory), "nas")
    assert "security.sudo.extraRules" not in fragment.options
    assert fragment.options["boot.binfmt.emulatedSystems"] == ["aarch64-linux"]


def test_every_shipped_fragment_passes_nixos_eval(shipped, tmp_path: Path):
    """NixOS's own module system (shared/nixos-eval) accepts every fragment of the shipped
    inventory: option names, types, sudo's rule, the units."""
    check = required_nixos_eval_check()
    specs = shipped
    paths = []
    for name in specs:
        fragment = fragments.host_fragment(specs, name)
        if fragment.sections:
            path = tmp_path / f"{name}.nix"
            path.write_text(fragment.render())
            paths.append(str(path))
    assert len(paths) == 4
    # The NAS with the shipped schedule enabled: its units, and the Nix environment they import
    # (nixos-eval follows the relative import and checks the expression too).
    shipped_schedule = runpy.run_path(str(REPO / "group_data" / "server.py"))["schedule"]
    scheduled = load_inventory(REPO / "inventory.py", REPO,
                               {"schedule": {**shipped_schedule, "enabled": True}})  # fmt: skip
    nas = fragments.host_fragment(check_fleet(scheduled), "nas")
    assert nas.uses_env
    (tmp_path / "scheduled").mkdir()
    (tmp_path / "scheduled" / "nas.nix").write_text(nas.render())
    _write_env(tmp_path / "scheduled")
    paths.append(str(tmp_path / "scheduled" / "nas.nix"))
    result = subprocess.run([str(check), *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASS") == 5, result.stdout


def test_nixos_eval_fails_a_fragment_nixos_would_refuse(tmp_path: Path):
    """The check above would catch a broken fragment: a sudo rule NixOS's module refuses."""
    check = nixos_eval_check()
    if check is None:
        pytest.skip("shared/nixos-eval is not beside this checkout")
    rule = {"users": ["beau"], "commands": [{"command": "ALL", "options": ["NOPASSWORD"]}]}
    bad = fragments.Fragment(
        "pi4", (fragments.Section("bad", {"security.sudo.extraRules": [rule]}),)
    )
    (tmp_path / "pi4.nix").write_text(bad.render())
    result = subprocess.run([str(check), str(tmp_path / "pi4.nix")], capture_output=True)
    assert result.returncode != 0


# -- nixfmt (RFC 166 style) shapes, from NixOS/nixfmt's tests and nixpkgs' formatted files ----


def test_lists_of_two_or_more_go_one_per_line_and_a_lone_element_stays_when_it_fits():
    # nixpkgs' pyinfra recipe, as nixfmt formats it: `build-system = [\n    hatchling\n
    # uv-dynamic-versioning\n  ];` and `pythonImportsCheck = [ "pyinfra" ];`.
    assert nix_binding("build-system", [Raw("hatchling"), Raw("uv-dynamic-versioning")], 2, 1) == (
        "build-system = [\n    hatchling\n    uv-dynamic-versioning\n  ];"
    )
    assert nix_binding("pythonImportsCheck", ["pyinfra"], 2, 1) == (
        'pythonImportsCheck = [ "pyinfra" ];'
    )
    # One element too long for the line (100 columns) is expanded too.
    key = "nas-nixpush-1:" + "A" * 43 + "="
    assert nix_binding("nix.settings.extra-trusted-public-keys", [key], 2, 1) == (
        f'nix.settings.extra-trusted-public-keys = [\n    "{key}"\n  ];'
    )
    assert nix_binding("x", [], 2, 1) == "x = [ ];"


def test_a_set_bound_to_a_name_is_always_expanded_and_one_in_a_list_stays_when_it_fits():
    # RFC 166 "Binders" and nixfmt 1.4.0: `a = { b = 1; };` becomes `a = {\n  b = 1;\n};`;
    # `[ { a = 1; } ]` stays; a set of two or more goes one attribute a line anywhere.
    assert nix_binding("a", {"b": 1}, 2, 1) == "a = {\n    b = 1;\n  };"
    assert nix_binding("a", {}, 2, 1) == "a = { };"
    assert nix_binding("x", [{"a": 1}], 2, 1) == "x = [ { a = 1; } ];"
    assert nix_binding("x", [{"a": {"b": 1}}], 2, 1) == (
        "x = [\n    {\n      a = {\n        b = 1;\n      };\n    }\n  ];"
    )
    rule = {"users": ["beau"], "commands": [{"command": "ALL", "options": ["NOPASSWD"]}]}
    assert nix_binding("r", [rule], 2, 1) == "\n".join(
        [
            "r = [",
            "    {",
            '      users = [ "beau" ];',
            "      commands = [",
            "        {",
            '          command = "ALL";',
            '          options = [ "NOPASSWD" ];',
            "        }",
            "      ];",
            "    }",
            "  ];",
        ]
    )


def test_a_simple_string_stays_on_the_line_of_its_name_however_long():
    # RFC 166 "Binders": a simple string is never moved to the next line.
    long = "x" * 120
    assert nix_binding("ExecStart", long, 2, 2) == f'ExecStart = "{long}";'
    assert nix_binding("ExecStart", "short", 2, 2) == 'ExecStart = "short";'


def test_a_fragment_declares_only_the_arguments_it_uses():
    # deadnix removes unused lambda arguments; nixfmt keeps `{ pkgs, ... }:` on one line and
    # puts `let ... in` before the body's own line (test/diff/lambda: `{ pkgs, ... }:\nlet`).
    plain = fragments.Fragment("pi4", (fragments.Section("c", {"nix.settings.max-jobs": 8}),))
    assert "\n{ ... }:\n{\n" in plain.render()
    text = _fragment().render()
    assert (
        "\n{ pkgs, ... }:\nlet\n  nixpushPython = import ./env/default.nix { inherit pkgs; };\n"
        "in\n{\n"
    ) in text
    assert "config" not in text.split("{ pkgs")[1].split("\n")[0]
    uses_pkgs = fragments.Fragment("x", (fragments.Section("c", {"p": [Raw("pkgs.git")]}),))
    assert "\n{ pkgs, ... }:\n{\n" in uses_pkgs.render()


def test_the_environments_metadata_registers_nixpushs_connector(tmp_path: Path):
    """What nixpush-env.nix's metadata-only package writes (its two printf lines, as printf
    reads them) is a distribution whose entry point pyinfra finds the @image connector by, the
    code coming from the checkout."""
    import importlib.metadata
    import re

    formats = re.findall(r"printf '([^']*)' *(?:\\\n *)?> \$dist/(\S+)", fragments.ENV_EXPRESSION)
    assert [name for _, name in formats] == ["METADATA", "entry_points.txt"]
    dist = tmp_path / "nixpush-0.1.0.dist-info"
    dist.mkdir()
    for text, name in formats:
        (dist / name).write_text(text.replace("\\n", "\n"))
    (found,) = importlib.metadata.distributions(path=[str(tmp_path)])
    assert found.metadata["Name"] == "nixpush"
    (entry,) = found.entry_points.select(group="pyinfra.connectors")
    assert entry.name == "image"
    from operations.builder.connector import ImageConnector

    assert entry.load() is ImageConnector


def test_keep_generations_limits_every_boot_loader_and_passes_the_nixos_check(tmp_path: Path):
    fragment = fragments.Fragment("pi4", (fragments.generations_section(3),))
    options = fragment.options
    for loader in ("generic-extlinux-compatible", "systemd-boot", "grub"):
        assert options[f"boot.loader.{loader}.configurationLimit"] == 3
    (tmp_path / "pi4.nix").write_text(fragment.render())

    result = subprocess.run(
        [str(required_nixos_eval_check()), str(tmp_path / "pi4.nix")],
        capture_output=True, text=True,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "configurationLimit = 3;" in fragment.render()


def test_a_target_with_keep_generations_gets_the_limit_in_its_fragment():
    spec = HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas")
    specs = {"nas": replace(spec, builder_host="nas", keep_generations=4)}
    fragment = fragments.host_fragment(specs, "nas")
    assert fragment.options["boot.loader.grub.configurationLimit"] == 4


# -- the real formatter: nixfmt (RFC 166), built from its source in shared/nixfmt ----------


def required_nixfmt() -> str:
    """nixfmt in the project's shared folder (``tests/shared.py``) or on PATH (tests/install.sh
    installs it); a test needing it fails under CI without it, else is skipped."""
    candidates = shared_candidates("nixfmt", "nixfmt")
    found = next((str(path) for path in candidates if path.is_file()), None)
    found = found or shutil.which("nixfmt")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nixfmt is missing: run tests/install.sh (it installs ../shared/nixfmt)")
        pytest.skip("no nixfmt here, nor ../shared/nixfmt beside this checkout")
    return found


def test_every_generated_nix_file_is_left_alone_by_nixfmt(shipped, tmp_path: Path):
    """nixfmt --check (nixfmt 1.4.0, what nixpkgs ships as nixfmt-rfc-style's successor)
    passes every file nixpush generates or ships: each shipped host's fragment with the
    schedule, its metrics, alert and node exporter on, a pulling target's and builder's, the
    environment, and the checkout's default.nix and shell.nix."""
    nixfmt = required_nixfmt()
    scheduled_data = {
        **runpy.run_path(str(REPO / "group_data" / "server.py"))["schedule"],
        "enabled": True,
        "metrics_dir": "/run/nixpush-metrics",
        "node_exporter": True,
        "on_failure": ["/bin/sh", "-c", "curl -fsS --data-binary @- https://ntfy.sh/T", "sh"],
    }
    scheduled = load_inventory(REPO / "inventory.py", REPO, {"schedule": scheduled_data})
    specs = check_fleet(scheduled)
    paths = [REPO / "default.nix", REPO / "shell.nix", REPO / "operations" / "nixos" / "env.nix"]
    for name in specs:
        fragment = fragments.host_fragment(specs, name)
        if fragment.sections:
            paths.append(tmp_path / f"{name}.nix")
            paths[-1].write_text(fragment.render())
    nas = replace(specs["nas"], ssh_host_key=HOST_KEY)
    pi = replace(specs["pi4"], builder_user="nix-ssh")
    pulling = fragments.Fragment("pi4", tuple(fragments.target_sections(
        pi, SSH_KEY, NIX_KEY, fragments.pull_client_options(pi, nas))))  # fmt: skip
    (tmp_path / "pulling.nix").write_text(pulling.render())
    (tmp_path / "serving.nix").write_text(_fragment().render())
    _write_env(tmp_path)
    paths += [tmp_path / "pulling.nix", tmp_path / "serving.nix", tmp_path / fragments.ENV_FILE]

    result = subprocess.run([nixfmt, "--check", *map(str, paths)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "programs.ssh.extraConfig = ''" in pulling.render()  # a multi-line string, too
    assert "unitConfig = {\n      Description" in (tmp_path / "nas.nix").read_text()


def test_the_checkouts_default_nix_is_the_environment_written_beside_the_fragments():
    env = REPO / "operations" / "nixos" / "env.nix"
    assert env.read_text(encoding="utf-8") == fragments.ENV_EXPRESSION
    default = (REPO / "default.nix").read_text(encoding="utf-8")
    assert "import ./operations/nixos/env.nix { inherit pkgs; }" in default
    shell = (REPO / "shell.nix").read_text(encoding="utf-8")
    assert "(import ./default.nix { inherit pkgs; })" in shell


# nixpkgs-unstable's pyinfra 3.9.2 recipe (pkgs/development/python-modules/pyinfra/default.nix):
# what the environment gives an older nixpkgs' recipe.
RECIPE_BUILD_SYSTEM = ["hatchling", "uv-dynamic-versioning"]
RECIPE_DEPENDENCIES = ["click", "distro", "gevent", "jinja2", "packaging", "paramiko", "pydantic",
                       "python-dateutil", "typeguard", "types-paramiko"]  # fmt: skip


@pytest.mark.skipif(NIX is None, reason="no Nix here")
@pytest.mark.parametrize("version", ["3.2", "3.4.1", "3.9.2"])
def test_the_environment_builds_pyinfra_3_9_2_on_a_nixpkgs_whose_pyinfra_is_older(version):
    """default.nix against a stand-in nixpkgs whose pyinfra is ``version`` (25.05: 3.2, 25.11:
    3.4.1, unstable: 3.9.2): an older one is overridden with 3.9.2's source and every build
    input and dependency of nixpkgs' 3.9.2 recipe, by its nixpkgs attribute name."""
    names = sorted({*RECIPE_BUILD_SYSTEM, *RECIPE_DEPENDENCIES, "pyyaml"})
    expression = (
        "let ps = builtins.listToAttrs (map (name: { inherit name; value = name; }) "
        f"[ {' '.join(nix_string(n) for n in names)} ]) // {{"
        f' pyinfra = {{ version = "{version}"; }} // (if "{version}" == "3.9.2" then {{ }} else'
        " { overridePythonAttrs = f: f { }; });"
        " buildPythonPackage = x: x; };"
        " pkgs = { lib.versionAtLeast = a: b: builtins.compareVersions a b >= 0;"
        ' fetchFromGitHub = x: x; python3 = { pkgs = ps; sitePackages = "lib";'
        " withPackages = f: f ps; }; };"
        f" in import {REPO / 'default.nix'} {{ inherit pkgs; }}"
    )
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    pyinfra, pyyaml, nixpush = json.loads(result.stdout)
    assert pyyaml == "pyyaml" and nixpush["pname"] == "nixpush"
    if version == "3.9.2":
        assert pyinfra["version"] == "3.9.2" and "dependencies" not in pyinfra  # nixpkgs' own
        return
    assert pyinfra["version"] == "3.9.2"
    assert pyinfra["src"]["tag"] == "v3.9.2"
    assert pyinfra["build-system"] == RECIPE_BUILD_SYSTEM
    assert pyinfra["dependencies"] == RECIPE_DEPENDENCIES
    assert pyinfra["UV_DYNAMIC_VERSIONING_BYPASS"] == "3.9.2"


def test_a_missing_inventory_file_says_so_and_names_the_key(tmp_path):
    with pytest.raises(FleetError) as caught:
        fragments.fleet_inventory("fleet.py", str(tmp_path))
    assert caught.value.problems == (
        f"nixpush_inventory: {tmp_path / 'fleet.py'} does not exist; run from the directory "
        "holding the fleet's inventory.py, or set --data nixpush_inventory=FILE to the fleet's "
        "inventory (relative to where pyinfra runs, or absolute)",
    )


def test_an_inventory_outside_the_checkout_is_read_with_its_group_data(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "group_data").mkdir(parents=True)
    (elsewhere / "fleet.py").write_text(
        'nas = {"nix_system": "x86_64-linux", "ssh_strict_host_key_checking": "yes"}\n'
        'server = [("nas", nas)]\n'
    )
    (elsewhere / "group_data" / "server.py").write_text('nixos_fragments_dir = "/srv/nixos"\n')
    checkout = tmp_path / "checkout"
    checkout.mkdir()

    inventory = fragments.fleet_inventory(str(elsewhere / "fleet.py"), str(checkout))

    specs = check_fleet(inventory)
    assert fragments.fragments_dir(specs["nas"]) == Path("/srv/nixos")


def test_a_builders_pool_passes_nixfmt_and_nixos_module_system(shipped, tmp_path: Path):
    """A pool (``remote_builders``) in the builder's fragment: ``nix.buildMachines`` with the
    member's systems, speed and features, the ssh alias and its pinned host key, as nixfmt
    leaves it and NixOS's module system accepts it."""
    nixfmt, check = required_nixfmt(), required_nixos_eval_check()
    member = replace(
        shipped["grill"], name="bld", ssh_hostname="10.0.0.9", ssh_host_key=HOST_KEY,
        builder_host=None, pool_systems=("aarch64-linux",), speed_factor=4,
    )  # fmt: skip
    builder = replace(shipped["nas"], remote_builders=("bld",))
    section = fragments.pool_section(builder, {**shipped, "nas": builder, "bld": member})
    path = tmp_path / "nas.nix"
    path.write_text(fragments.Fragment("nas", (section,)).render())

    formatted = subprocess.run([nixfmt, "--check", str(path)], capture_output=True, text=True)
    evaluated = subprocess.run([str(check), str(path)], capture_output=True, text=True)

    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    text = path.read_text()
    assert 'systems = [ "aarch64-linux" ];' in text and "speedFactor = 4;" in text
    assert "nix.distributedBuilds = true;" in text
