"""Names, addresses and paths by grammar: every value nixpush puts into a command,
a store URL, a Nix file or a file name is checked whole, so no trailing newline, no ``?``/``&``
and no ``../`` gets through."""

from __future__ import annotations

from pathlib import Path

import pytest

from operations.core import grammar
from operations.data.fleet import FleetError, check_fleet, fleet_errors
from operations.nixos.fragments import fragment_path
from tests.unit.test_fleet import NAS_DATA, fleet, only_problem


@pytest.mark.parametrize("name", ["pi4", "nas.lan", "pi_4", "4pi", "Pi-4"])
def test_host_names_that_are_names(name):
    assert grammar.is_host_name(name)


@pytest.mark.parametrize("name", ["pi\n", "pi4\nbuiltins.trace", "../../../tmp/x", ".pi", "-pi",
                                  "_pi", "p i", "pi/4", "", "pi4?x"])  # fmt: skip
def test_host_names_that_are_not(name):
    assert not grammar.is_host_name(name)


@pytest.mark.parametrize("name", ["pi\nbuiltins.trace", "../../../tmp/x"])
def test_an_inventory_host_with_a_name_that_is_no_name_is_refused(write_inventory, name):
    groups = fleet()
    groups["minimal"].append((name, NAS_DATA))
    problem = only_problem(write_inventory(groups))
    assert problem == (
        f"{name!r}: the host name is not letters, digits, '.', '_' and '-' starting with a "
        "letter or digit; rename the host (its name becomes file names, Nix attributes and "
        "SSH aliases)"
    )


def test_a_fragment_is_written_only_inside_its_directory(tmp_path):
    assert fragment_path(tmp_path, "pi4") == tmp_path / "pi4.nix"
    for name in ("../../../tmp/x", "pi\n4", "/etc/x", ".."):
        with pytest.raises(FleetError) as refused:
            fragment_path(tmp_path, name)
        assert str(refused.value) == (
            f"the inventory has 1 problem:\n  {name!r}: no fragment is written for this host: "
            f"its name would leave {tmp_path}; rename the host"
        )


@pytest.mark.parametrize(
    "address", ["pi4", "pi4.lan", "pi4.lan.", "192.168.1.122", "my_host.example.org"]
)
def test_addresses_that_are_dns_names_or_ipv4(write_inventory, address):
    assert grammar.address_problem(address) is None
    assert fleet_errors(write_inventory(fleet(pi={"ssh_hostname": address}))) == []


@pytest.mark.parametrize(
    "address",
    ["pi.test?remote-program=sh", "pi.test&ssh-key=/x", "pi.test/x", "999.1.1.1",
     "192.168.1", "pi..lan", "pi.lan:22", "x" * 254],
)  # fmt: skip
def test_addresses_that_would_add_store_url_parameters_or_lines_are_refused(
    write_inventory, address
):
    problem = only_problem(write_inventory(fleet(pi={"ssh_hostname": address})))
    assert problem.startswith(f"pi: ssh_hostname {address!r} is not ")
    assert problem.endswith(
        "; set the bare address: a DNS name or an IPv4 address (no user@, :port, path or ?options)"
    )


@pytest.mark.parametrize("user", ["beau?remote-program=sh", "beau/x", "be&au", "1beau", "beau$x"])
def test_ssh_users_that_are_not_account_names_are_refused(write_inventory, user):
    problem = only_problem(write_inventory(fleet(pi={"ssh_user": user})))
    assert problem == (
        f"pi: ssh_user {user!r} is not an account name; set the bare user name (a letter or _, "
        "then letters, digits, '_', '.', '-')"
    )


def test_builder_user_with_a_trailing_newline_is_refused(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"builder_user": "nix-ssh\n"})))
    assert problem.startswith("pi: builder_user 'nix-ssh\\n' is not a dedicated account name")


@pytest.mark.parametrize(
    "key",
    [
        "sops_file",
        "nixpush_sops_file",
        "nixos_fragments_dir",
        "nixpush_inventory",
        "ssh_key",
        "ssh_known_hosts_file",
        "ssh_config_file",
    ],
)
@pytest.mark.parametrize("value", ["/srv/x\n/y", "/srv/x\r", "/srv/x\0"])
def test_path_like_values_with_a_line_break_are_refused(write_inventory, key, value):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem == f"pi: {key} {value!r} has a line break or NUL; set it to a one-line path"


def test_image_dest_with_a_line_break_is_refused(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"image_dest": "/srv/\n"})))
    assert problem == "pi: image_dest is '/srv/\\n'; set it to an absolute path on the controller"


def test_image_attr_with_a_trailing_newline_is_refused(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"image_attr": "sdImage\n"})))
    assert problem.startswith("pi: image_attr 'sdImage\\n' is not an attribute name;")


def test_the_fragments_dir_comes_from_the_checked_spec(write_inventory, tmp_path):
    from operations.nixos.fragments import fragments_dir

    specs = check_fleet(write_inventory(fleet(pi={"nixos_fragments_dir": "/x"})))
    assert fragments_dir(specs["pi"], str(tmp_path)) == Path("/x")
    assert fragments_dir(specs["nas"], str(tmp_path)) == tmp_path / "nixos"
