"""Provenance: what the target records after a confirmed switch, how a check reads it back,
and where the finding and the deploy's revision are reported."""

from __future__ import annotations

from types import SimpleNamespace

from operations.core.summary import RunSummary
from operations.push import provenance
from operations.run import metrics, report
from tests.unit.test_activation import NEW, OLD, plan
from tests.unit.test_metrics import report as run_report
from tests.unit.test_metrics import samples, value


def test_the_record_is_written_root_only_and_atomically_with_the_path_quoted():
    hostile = "/var/lib/nix push/$(whoami); x"
    command = provenance.write_command(hostile).get_raw_value()
    assert command.endswith("nixpush-record '/var/lib/nix push/$(whoami); x'"), command
    script = provenance._WRITE
    assert script.startswith("umask 077 && ")  # the file (and a directory made for it): 0600
    assert "chmod" not in script  # a directory already there is left as it is
    assert script.endswith('cat > "$1.new" && mv -f "$1.new" "$1"')  # renamed whole
    read = provenance.read_command().get_raw_value()
    assert read.endswith(f"nixpush-record {provenance.PROVENANCE_FILE}"), read


def test_a_record_is_read_back_and_anything_else_is_none():
    assert provenance.parse_record(['{"system": "/nix/store/x", "action": "switch"}']) == {
        "system": "/nix/store/x",
        "action": "switch",
    }
    assert provenance.parse_record(["nixpush-no-record"]) is None
    assert provenance.parse_record(["not json"]) is None
    assert provenance.parse_record(['{"other": 1}']) is None
    assert provenance.parse_record([]) is None


def test_running_another_system_than_nixpush_deployed_is_a_finding():
    record = {"system": NEW}
    assert provenance.outside_change(NEW, record) is None
    assert provenance.outside_change(NEW, None) is None  # never recorded: no finding
    assert provenance.outside_change(OLD, record) == (
        f"changed outside nixpush: runs {OLD}, nixpush deployed {NEW}"
    )


def test_the_revision_is_the_git_revision_else_the_nar_hash():
    assert provenance.flake_revision({"revision": "abc", "narHash": "sha256-x"}) == "abc"
    assert provenance.flake_revision({"revision": None, "narHash": "sha256-x"}) == "sha256-x"
    assert provenance.flake_revision({"error": "x"}) is None


def test_only_a_switch_to_a_new_system_is_recorded():
    assert provenance.records(plan())
    assert provenance.records(plan("rollback", desired=OLD, current=NEW))
    assert not provenance.records(plan(current=NEW, profile=NEW))  # up to date
    assert not provenance.records(plan("boot")) and not provenance.records(plan("test"))


def _summary(executed: bool) -> RunSummary:
    class Host:
        def __init__(self, name: str) -> None:
            self.name, self.connected = name, True

    hosts = [Host(n) for n in ("pi4", "pi5")]
    state = SimpleNamespace(
        inventory=hosts, failed_hosts=set(), current_stage=99 if executed else 0,
        is_host_in_limit=lambda h: True,
    )  # fmt: skip
    return RunSummary(state)  # type: ignore[arg-type]


def test_a_check_reports_a_change_outside_nixpush_as_drift_of_its_own_kind():
    summary = _summary(executed=False)
    finding = f"changed outside nixpush: runs {OLD}, nixpush deployed {NEW}"
    summary.planned(plan(target="pi4", desired=OLD, current=OLD, profile=OLD))  # up to date
    summary.changed_outside("pi4", finding)
    summary.planned(plan(target="pi5"))  # differs from the flake as well
    summary.changed_outside("pi5", finding)
    outcomes = summary.outcomes()
    assert outcomes["pi4"] == ("drifted", finding)
    assert outcomes["pi5"] == ("planned", f"would switch {NEW} (now {OLD}); {finding}")
    assert f"pi4: drifted: {finding}" in summary.lines()
    hosts = report.host_outcomes(summary.report(), None, "", executed=False)
    assert hosts["pi4"].status == "drifted" and hosts["pi4"].cause == finding
    assert hosts["pi5"].status == "drifted"


def test_the_report_and_metrics_carry_the_deploys_revision_and_the_address_used():
    summary = _summary(executed=True)
    summary.planned(plan(target="pi4"))
    summary.deployed_from("pi4", "0123abcd")
    summary.reached_via("pi4", "pi4.tail.ts.net")
    assert summary.outcomes()["pi4"] == ("deployed", f"switch {NEW}; via pi4.tail.ts.net")
    entry = summary.report()["hosts"]["pi4"]
    assert entry["revision"] == "0123abcd" and entry["address"] == "pi4.tail.ts.net"
    outcome = report.host_outcomes(summary.report(), None, "", executed=True)["pi4"]
    assert outcome.paths["revision"] == "0123abcd"

    hosts = {"pi4": {"status": "changed", "cause": "", **outcome.paths}}
    run = run_report(mode="deploy", exit_code=0, **hosts)
    found = samples(metrics.render(run, metrics.LastSuccess().updated(run)))
    labels = {"mode": "deploy", "host": "pi4", "revision": "0123abcd"}
    assert value(found, "nixpush_host_revision_info", **labels) == 1


def test_the_record_goes_where_provenance_file_says_never_under_etc(write_inventory):
    from tests.unit.test_fleet import fleet, only_problem

    problem = only_problem(write_inventory(fleet(pi={"provenance_file": "/etc/nixpush.json"})))
    assert problem.startswith("pi: provenance_file is '/etc/nixpush.json', under /etc"), problem


def test_a_relative_provenance_file_is_refused(write_inventory):
    from tests.unit.test_fleet import fleet, only_problem

    problem = only_problem(write_inventory(fleet(pi={"provenance_file": "deployed.json"})))
    assert "set it to an absolute file path on the target" in problem, problem


def test_a_host_answering_on_none_of_its_addresses_names_them_unless_excused():
    summary = _summary(executed=True)
    pi4, pi5 = summary.state.inventory
    pi4.connected = pi5.connected = False
    summary.state.failed_hosts.update({pi4, pi5})
    summary.unreachable.update({"pi4", "pi5"})
    summary.tried_addresses("pi4", ("pi4.lan", "pi4.ts.net"))
    summary.tried_addresses("pi5", ("pi5.lan", "pi5.ts.net"))
    summary.forgive(["pi4"])  # pi5 is a bystander this deploy does not need
    outcomes = summary.outcomes()
    assert outcomes["pi4"] == ("failed", "could not connect (tried pi4.lan, pi4.ts.net)")
    assert outcomes["pi5"] == ("skipped", "unreachable, not needed by this deploy")
