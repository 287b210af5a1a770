"""The owner's fleet (inventory.py + group_data/) as the pyinfra CLI loads it."""

from __future__ import annotations

import shutil

import pytest
from pyinfra.api.inventory import Inventory

from operations.builder.connector import ImageConnector
from operations.builder.pull import pulling_targets
from operations.data.fleet import ROOTS, builders, check_fleet, host_secrets, host_spec
from tests.unit.conftest import REPO, load_inventory

# The roots table from the owner's notes (seeds/000): root -> hosts.
SEED_ROOTS = {
    "minimal": {"grill", "laptop", "nas", "pi4"},
    "common": {"grill", "laptop", "nas", "pi4"},
    "network": {"grill", "laptop", "nas", "pi4"},
    "main": {"grill", "laptop", "nas"},
    "work": {"grill", "laptop"},
    "gaming": {"grill"},
    "server": {"nas"},
}


@pytest.fixture(scope="module")
def inventory() -> Inventory:
    return load_inventory(REPO / "inventory.py", REPO)


def test_root_groups_match_the_seed_table(inventory):
    groups = {root: {host.name for host in inventory.get_group(root)} for root in ROOTS}
    assert groups == SEED_ROOTS


def test_pi4_connection_and_build_data(inventory):
    pi4 = inventory.get_host("pi4")
    assert pi4.data.get("ssh_hostname") == "192.168.1.122"
    assert pi4.data.get("ssh_port") == 8023
    assert pi4.data.get("ssh_user") == "beau"
    assert pi4.data.get("_sudo") is True

    spec = host_spec(pi4)
    assert spec.nix_system == "aarch64-linux"
    assert spec.builder_host == "nas"
    assert spec.is_target
    assert spec.nixos_config == "pi4"


def test_pull_builds_are_off_until_the_two_readme_lines_turn_them_on(inventory, tmp_path):
    # Off: no builder_user, no builder-client secret, so deploys/nas.py needs no ssh/pi4_builder.
    assert not pulling_targets(check_fleet(inventory), "nas")
    assert "/root/.ssh/nixpush_builder" not in [
        s.dest for s in host_secrets(inventory.get_host("pi4"))
    ]
    # The README's two lines, uncommented in place, turn them on.
    text = (REPO / "inventory.py").read_text()
    lines = ['# "builder_user": "nix-ssh",', '# "secrets": [{"key": "ssh/pi4_builder", ']
    assert all(line in text for line in lines)
    for line in lines:
        text = text.replace(line, line.removeprefix("# "))
    (tmp_path / "inventory.py").write_text(text)
    shutil.copytree(REPO / "group_data", tmp_path / "group_data")
    on = load_inventory(tmp_path / "inventory.py", tmp_path)
    (pi4,) = pulling_targets(check_fleet(on), "nas")
    assert (pi4.name, pi4.builder_user) == ("pi4", "nix-ssh")
    secret = host_secrets(on.get_host("pi4"))[-1]
    assert (secret.label, secret.dest, secret.mode) == (
        "ssh/pi4_builder", "/root/.ssh/nixpush_builder", 0o600,
    )  # fmt: skip


def test_iso_is_an_image_host_never_connected_and_in_no_root(inventory):
    iso = inventory.get_host("iso")
    assert iso.connector_cls is ImageConnector
    assert all(iso not in inventory.get_group(root) for root in ROOTS)
    spec = host_spec(iso)
    assert spec.is_image and not spec.is_target
    assert (spec.builder_host, spec.image_attr) == ("nas", "isoImage")


def test_desktop_and_laptop_are_built_on_the_nas_and_the_laptop_may_sleep(inventory):
    for name in ("grill", "laptop"):
        spec = host_spec(inventory.get_host(name))
        assert spec.is_target and spec.pushed_by == "nas", name
        assert spec.nix_system == "x86_64-linux"
    assert host_spec(inventory.get_host("laptop")).offline_ok
    assert not host_spec(inventory.get_host("grill")).offline_ok


def test_every_host_checks_host_keys_strictly(inventory):
    for host in inventory:
        assert host.data.get("ssh_strict_host_key_checking") == "yes", host.name


def test_every_host_has_the_fleet_wide_flake_and_sops_file(inventory):
    flakes = {host.data.get("flake") for host in inventory}
    sops_files = {host.data.get("sops_file") for host in inventory}
    assert len(flakes) == 1 and None not in flakes
    assert len(sops_files) == 1 and None not in sops_files


def test_server_root_makes_nas_a_builder_for_aarch64(inventory):
    nas = inventory.get_host("nas")
    assert nas.data.get("binfmt_emulated_systems") == ["aarch64-linux"]
    assert nas.data.get("nix_max_jobs") == 8

    spec = host_spec(nas)
    assert "aarch64-linux" in spec.builder_systems
    assert "x86_64-linux" in spec.builder_systems
    assert spec.nix_max_jobs == 8
    assert spec.is_target and spec.builds_itself and spec.pushed_by is None


def test_nixpush_installs_nothing_sops_nix_already_installs(inventory):
    # The owner's sops-nix installs the Tailscale pre-auth key: the network root has no copy.
    for host in inventory.get_group("network"):
        keys = [secret.label for secret in host_secrets(host)]
        assert "headscale/pre_auth" not in keys, host.name


def test_group_data_holds_no_host_specific_values(inventory):
    host_keys = {"ssh_hostname", "ssh_port", "ssh_user", "nix_system", "builder_host"}
    host_names = {host.name for host in inventory}
    for root in ROOTS:
        data = inventory.get_group_data(root)
        assert not host_keys & data.keys(), root
        assert not host_names & {str(value) for value in data.values()}, root


def test_fleet_passes_its_checks(inventory):
    specs = check_fleet(inventory)
    assert set(specs) == {host.name for host in inventory}
    assert builders(specs) == ["nas"]
    pi4 = specs["pi4"]
    assert pi4.builder_host is not None
    assert pi4.nix_system in specs[pi4.builder_host].builder_systems
