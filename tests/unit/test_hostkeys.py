"""No host key accepted blind: an unset ``ssh_strict_host_key_checking`` is pyinfra's
accept-new and is refused like it on every host nixpush connects to; a host with
``ssh_host_key`` is pinned to it (``operations.trust.hostkeys``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from operations.data.fleet import fleet_errors
from operations.trust import hostkeys
from tests.unit.conftest import REPO, load_inventory
from tests.unit.test_fleet import HOST_KEY, NAS_DATA, fleet, only_problem

FIX = (
    'set it to "yes" (the host\'s key in its known_hosts file, or pinned from its ssh_host_key '
    "by operations.trust.hostkeys.pin_host_keys in the inventory), or set "
    "insecure_ssh_host_key_checking = True to accept that"
)


def unset_on(name: str) -> dict[str, object]:
    return {name: {"ssh_strict_host_key_checking": None}}


@pytest.mark.parametrize("host", ["nas", "pi"])
def test_unset_checking_is_accept_new_and_refused(write_inventory, host):
    problem = only_problem(write_inventory(fleet(**unset_on(host))))
    assert problem == (
        f"{host}: ssh_strict_host_key_checking is unset, which pyinfra takes as 'accept-new': "
        f"an impostor could take this host's place when nixpush connects to it; {FIX}"
    )


def test_unset_or_loose_checking_is_refused_on_hosts_nixpush_neither_pushes_to_nor_builds_on(
    write_inventory,
):
    # deploys/secrets.py sends it secrets, and every deploy connects to it.
    groups = fleet()
    groups["minimal"].append(("laptop", {"nix_system": "x86_64-linux"}))
    groups["minimal"].append(
        ("desk", {"nix_system": "x86_64-linux", "ssh_strict_host_key_checking": "no"})
    )
    assert fleet_errors(write_inventory(groups)) == [
        "laptop: ssh_strict_host_key_checking is unset, which pyinfra takes as 'accept-new': "
        f"an impostor could take this host's place when nixpush connects to it; {FIX}",
        "desk: ssh_strict_host_key_checking is 'no', so an impostor could take this host's "
        f"place when nixpush connects to it; {FIX}",
    ]


def test_hosts_nixpush_does_not_reach_over_ssh_need_no_checking(write_inventory):
    groups = fleet()
    groups["minimal"].append(("@local", {"nix_system": "x86_64-linux"}))
    groups["images"] = [("@image/iso", {"nix_system": "x86_64-linux", "builder_host": "nas"})]
    assert fleet_errors(write_inventory(groups)) == []


def test_accepting_the_risk_is_still_possible(write_inventory):
    insecure = {"ssh_strict_host_key_checking": None, "insecure_ssh_host_key_checking": True}
    assert fleet_errors(write_inventory(fleet(nas=insecure, pi=insecure))) == []


# -- pinning ---------------------------------------------------------------------------


def test_a_host_with_ssh_host_key_is_pinned_to_it():
    data = {"ssh_hostname": "10.0.0.2", "ssh_port": 8023, "ssh_host_key": f"{HOST_KEY} pi@x"}
    pinned = hostkeys.pinned(data)
    assert pinned["ssh_strict_host_key_checking"] == "yes"
    known_hosts = Path(pinned["ssh_known_hosts_file"])
    assert known_hosts.read_text() == f"[10.0.0.2]:8023 {HOST_KEY}\n"
    assert known_hosts.parent.stat().st_mode & 0o777 == 0o700  # the controller user's alone
    assert {k: v for k, v in pinned.items() if k in data} == data  # the rest as it was
    # The same key again: the same file; port 22 is written bare, like ssh does.
    assert hostkeys.pinned(data)["ssh_known_hosts_file"] == str(known_hosts)
    plain = hostkeys.pinned({"ssh_hostname": "pi4.lan", "ssh_host_key": HOST_KEY})
    assert Path(plain["ssh_known_hosts_file"]).read_text() == f"pi4.lan {HOST_KEY}\n"


@pytest.mark.parametrize(
    "data",
    [
        {"ssh_hostname": "pi4.lan"},  # no key: the host's known_hosts file is used
        {"ssh_host_key": HOST_KEY},  # no address to pin it to
        {"ssh_hostname": "pi4.lan", "ssh_host_key": "ssh-ed25519 AAAA\n* ssh-ed25519 AAAA"},
        {"ssh_hostname": "pi4.lan\n*", "ssh_host_key": HOST_KEY},
        {"ssh_hostname": "pi4.lan", "ssh_port": "22\n*", "ssh_host_key": HOST_KEY},
    ],
)
def test_nothing_is_pinned_without_a_key_and_an_address_that_are_sound(data):
    # A malformed value is left to the fleet check, which refuses it with its fix.
    assert hostkeys.pinned(data) == data


def test_explicit_checking_is_kept():
    data = {
        "ssh_hostname": "pi4.lan",
        "ssh_host_key": HOST_KEY,
        "ssh_strict_host_key_checking": "no",
    }
    assert hostkeys.pinned(data)["ssh_strict_host_key_checking"] == "no"  # refused by the check


def test_pin_host_keys_pins_each_member_of_a_group():
    members = [("pi4", {"ssh_hostname": "pi4.lan", "ssh_host_key": HOST_KEY}), ("nas", NAS_DATA)]
    pinned = hostkeys.pin_host_keys(members)
    assert [name for name, _ in pinned] == ["pi4", "nas"]
    assert "ssh_known_hosts_file" in pinned[0][1] and pinned[1][1] == NAS_DATA


def test_the_owners_inventory_pins_every_host_that_has_a_key(tmp_path):
    # inventory.py's keys are placeholders until the owner fills them in: one is enough.
    source = (REPO / "inventory.py").read_text()
    marker = '            "builder_host": "nas",\n            # Fill in from'
    assert marker in source
    (tmp_path / "inventory.py").write_text(
        source.replace(marker, f'            "builder_host": "nas", "ssh_host_key": "{HOST_KEY}",'
                       "\n            # Fill in from")
    )  # fmt: skip
    (tmp_path / "group_data").symlink_to(REPO / "group_data")
    inventory = load_inventory(tmp_path / "inventory.py", tmp_path)
    grill = inventory.get_host("grill")
    known_hosts = Path(grill.data.get("ssh_known_hosts_file"))
    assert known_hosts.read_text() == f"grill.lan {HOST_KEY}\n"
    assert grill.data.get("ssh_strict_host_key_checking") == "yes"
    assert inventory.get_host("laptop").data.get("ssh_known_hosts_file") is None


# -- several addresses, tried in order -------------------------------------------------


def test_the_first_address_that_answers_is_chosen_and_all_are_tried_at_once():
    from operations.core.addresses import answering

    tried = []

    def probe(address, port, timeout):
        tried.append((address, port))
        return address in ("b.lan", "c.lan", "z.lan")

    hosts = {"laptop": (("a.lan", "b.lan", "c.lan"), 22), "pi": (("x.lan", "z.lan"), 8023)}
    assert answering(hosts, probe) == {"laptop": "b.lan", "pi": "z.lan"}
    assert sorted(tried) == sorted(
        [("a.lan", 22), ("b.lan", 22), ("c.lan", 22), ("x.lan", 8023), ("z.lan", 8023)]
    )
    assert answering({"away": (("a.lan", "b.lan"), 22)}, lambda *_: False) == {"away": None}


def test_a_host_with_one_address_is_not_probed():
    from operations.core.addresses import answering

    def probe(*_):
        raise AssertionError("probed")

    assert answering({"pi4": (("pi4.lan",), 22)}, probe) == {"pi4": "pi4.lan"}
    # Nor is one whose ssh_hostname is a string (the inventory's usual case).
    data = {"ssh_hostname": "pi4.lan", "ssh_host_key": HOST_KEY}
    assert hostkeys.choose_addresses([("pi4", data)]) == [("pi4", data)]


def test_choose_addresses_sets_the_answering_address_and_keeps_the_list(monkeypatch):
    import operations.core.addresses as addresses

    monkeypatch.setattr(hostkeys, "_ANSWERED", {})
    answers = {"10.0.0.2": False, "100.64.0.2": True}
    monkeypatch.setattr(addresses, "tcp_answers", lambda a, p, t: answers[a])
    monkeypatch.setattr(
        hostkeys, "answering", lambda hosts: addresses.answering(hosts, addresses.tcp_answers)
    )
    data = {"ssh_hostname": ["10.0.0.2", "100.64.0.2"], "ssh_port": 8023, "ssh_host_key": HOST_KEY}
    ((_, chosen),) = hostkeys.pin_host_keys([("pi4", data)])
    assert chosen["ssh_hostname"] == "100.64.0.2"
    assert chosen["ssh_addresses"] == ["10.0.0.2", "100.64.0.2"]
    # The pinned line names every address: the host keeps its key on either.
    assert Path(chosen["ssh_known_hosts_file"]).read_text() == (
        f"[10.0.0.2]:8023,[100.64.0.2]:8023 {HOST_KEY}\n"
    )
    # None answers: the first, which pyinfra then fails to connect to.
    answers["100.64.0.2"] = False
    data2 = {**data, "ssh_hostname": ["10.0.0.3", "100.64.0.2"]}
    answers["10.0.0.3"] = False
    ((_, first),) = hostkeys.choose_addresses([("pi5", data2)])
    assert first["ssh_hostname"] == "10.0.0.3"


def test_every_address_goes_through_the_grammar(write_inventory):
    problem = only_problem(
        write_inventory(fleet(pi={"ssh_hostname": "pi.test", "ssh_addresses": ["pi.test", "x?y"]}))
    )
    assert problem.startswith("pi: ssh_hostname 'x?y' is not a DNS name or an IPv4 address"), (
        problem
    )


def test_a_list_no_address_was_chosen_from_is_refused_with_the_fix(write_inventory):
    problem = only_problem(write_inventory(fleet(pi={"ssh_hostname": ["pi.test", "pi.ts.net"]})))
    assert "no address was chosen from it; build the inventory's groups with pin_host_keys" in (
        problem
    )
