"""The owner's shipped data and checklist agree with themselves: the nightly deploy touches
only always-on targets, and every command of the first-deploy checklist names deploys and
hosts that exist."""

from __future__ import annotations

import runpy

from operations.data.fleet import check_fleet
from operations.data.schedule import parse_schedule
from tests.checklist import checklist_steps
from tests.unit.conftest import REPO, load_inventory


def test_the_nightly_deploy_is_limited_to_the_always_on_targets():
    inventory = load_inventory(REPO / "inventory.py", REPO)
    specs = check_fleet(inventory)
    data = runpy.run_path(str(REPO / "group_data" / "server.py"))["schedule"]
    schedule = parse_schedule("nas", {**data, "enabled": True})
    runs = {run.mode: run for run in schedule.runs}
    deploy = runs["deploy"].limit
    assert deploy == ("pi4",)
    for name in deploy:
        spec = specs[name]
        # A target, never asleep, and not the host running the deploy.
        assert spec.is_target and not spec.offline_ok and name != "nas", name
    assert set(runs["check"].limit) <= {"nas", "pi4"}


def test_every_checklist_command_names_a_deploy_and_hosts_that_exist():
    specs = check_fleet(load_inventory(REPO / "inventory.py", REPO))
    steps = checklist_steps()
    assert [number for number, _ in steps] == ["6", "7", "8", "9", "10", "11"]
    commands = [command for _, step in steps for command in step]
    assert commands
    for command in commands:
        assert command[0] == "pyinfra", command
        assert (REPO / command[2]).is_file(), command
        limits = [command[i + 1] for i, arg in enumerate(command) if arg == "--limit"]
        assert set(limits) <= set(specs), command


def test_the_readme_quotes_the_shipped_schedule_word_for_word():
    """One truth for the schedule: the README's example is group_data/server.py's own text."""
    server = (REPO / "group_data" / "server.py").read_text()
    shipped = server[server.index("schedule = {") :]
    shipped = shipped[: shipped.index("\n}\n") + 3]
    readme = (REPO / "README.md").read_text()
    quoted = readme[readme.index("<!-- quoted from group_data/server.py -->") :]
    quoted = quoted[quoted.index("```python\n") + len("```python\n") :]
    assert quoted[: quoted.index("```")] == shipped
