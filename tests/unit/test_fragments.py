"""Nix values and fragments: escaping (hostile values stay data), the unit-file round trip, and
valid Nix (``nix-instantiate --parse``, ``nix eval`` against a stub module) without a bench."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from operations import fragments, schedule
from operations.fleet import HostSpec
from operations.nixexpr import Attr, Raw, nix_string, nix_value
from tests.bench import nixos

NIX = shutil.which("nix-instantiate")
HOSTILE = 'a"b\\c${builtins.abort "x"}\n\'\'${x}'
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNixpushTestKeyBlobAAAAAAAAAAAAAAAAAAAAAA"
NIX_KEY = "nas-nixpush-1:" + "A" * 43 + "="
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyBlobBBBBBBBBBBBBBBBBBBBBBBBBBBB"
SCHEDULE = schedule.parse_schedule(
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
    units = schedule.unit_files(SCHEDULE)
    options = fragments.schedule_options(units)
    service = options[("systemd", "services", "nixpush-check")]
    timer = options[("systemd", "timers", "nixpush-check")]
    assert service["serviceConfig"]["User"] == "beau"
    assert service["serviceConfig"]["SuccessExitStatus"] == "2 75"
    assert service["path"] == [Raw("pkgs.openssh"), Raw("pkgs.git")]
    assert timer["wantedBy"] == ["timers.target"]
    assert timer["timerConfig"]["OnCalendar"] == "hourly"
    assert "Install" not in timer


def _fragment(value: str = "aarch64-linux") -> fragments.Fragment:
    nas = HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas",
                   binfmt_emulated_systems=(value,), nix_max_jobs=8)  # fmt: skip
    pi = HostSpec(name="pi4", nix_system="aarch64-linux", nixos_config="pi4", builder_host="nas",
                  ssh_user="beau", ssh_hostname="192.168.1.122", ssh_port=8023)  # fmt: skip
    sections = [
        *fragments.builder_sections(nas, {"nix-ssh": [f"{SSH_KEY} nixpush-pull:pi4"]},
                                    schedule.unit_files(SCHEDULE)),
        *fragments.target_sections(pi, SSH_KEY, NIX_KEY, {"programs.ssh.extraConfig": HOSTILE}),
    ]  # fmt: skip
    return fragments.Fragment("nas", tuple(sections))


@pytest.mark.skipif(NIX is None, reason="no Nix here")
def test_a_fragment_parses_and_evaluates_against_a_stub_module(tmp_path: Path):
    path = tmp_path / "nas.nix"
    path.write_text(_fragment().render())

    parsed = subprocess.run([str(NIX), "--parse", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr

    options = nixos.evaluate(path)
    assert nixos.get(options, "nix.settings.max-jobs") == 8
    assert nixos.get(options, "nix.settings.extra-trusted-public-keys") == [NIX_KEY]
    assert nixos.get(options, "users.users.beau.openssh.authorizedKeys.keys") == [SSH_KEY]
    assert nixos.get(options, "programs.ssh.extraConfig") == HOSTILE  # data, never evaluated
    check = nixos.get(options, "systemd.services.nixpush-check.serviceConfig.ExecStart")
    assert check == " ".join(schedule.exec_quote(a) for a in
                             schedule.command_line(SCHEDULE, SCHEDULE.runs[0]))  # fmt: skip


def test_a_multi_line_string_renders_as_an_indented_string():
    text = _fragment().render()
    assert "  programs.ssh.extraConfig = ''\n" not in text  # HOSTILE holds ${: quoted
    multi = nix_value({"x": "Host a\nPort 22\n"}, indent=2)
    assert multi == "{\n  x = ''\n    Host a\n    Port 22\n  '';\n}"


NIXOS_EVAL = Path(os.environ.get("NIXOS_EVAL_CHECK", "/work/shared/nixos-eval/check"))


class _Inventory:
    """What ``host_fragment`` reads of a pyinfra inventory for a host that builds nothing."""

    def __init__(self, data: dict[str, object]) -> None:
        self.data = data

    def get_host(self, name: str) -> _Inventory:
        return self


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
    specs = {"nas": HostSpec(name="nas", nix_system="x86_64-linux", nixos_config="nas")}
    return fragments.host_fragment(_Inventory({"schedule": data}), specs, "nas")  # type: ignore[arg-type]


def test_the_fragment_wires_metrics_and_on_failure_and_the_node_exporter_when_asked():
    options = _alerting_fragment().options
    node = "services.prometheus.exporters.node"
    assert options[f"{node}.enable"] is True
    assert options[f"{node}.enabledCollectors"] == ["textfile"]
    assert options[f"{node}.extraFlags"] == ["--collector.textfile.directory=/run/nixpush-metrics"]
    service = options[("systemd", "services", "nixpush-deploy")]["serviceConfig"]
    assert service["RuntimeDirectory"] == "nixpush-metrics"
    assert service["RuntimeDirectoryMode"] == "0755"
    assert '"--metrics-dir" "/run/nixpush-metrics"' in service["ExecStart"]
    assert (
        '"--on-failure=curl -fsS -T \\"$$1\\" https://ntfy.sh/beau-nixpush"'
        in (service["ExecStart"])
    )
    unasked = _alerting_fragment(node_exporter=False).options
    assert not [key for key in unasked if "prometheus" in str(key)]


@pytest.mark.skipif(not NIXOS_EVAL.exists(), reason="no nixos-eval checker here")
def test_a_fragment_with_metrics_on_failure_and_the_node_exporter_passes_the_nixos_check(
    tmp_path: Path,
):
    for name, fragment in {
        "exporter.nix": _alerting_fragment(),
        "elsewhere.nix": _alerting_fragment(metrics_dir="/var/lib/node-exporter"),
    }.items():
        (tmp_path / name).write_text(fragment.render())
    files = sorted(str(p) for p in tmp_path.glob("*.nix"))

    result = subprocess.run([str(NIXOS_EVAL), *files], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
