"""Substitution on the target (``substitute_on_target``): the data key, the copy command that
asks the target to fetch from its own substituters first, and the step that passes it on."""

from __future__ import annotations

from typing import Any

from operations.data.fleet import check_fleet
from operations.push import copy
from operations.push.commands import copy_command
from operations.push.runcache import RunCache
from tests.unit.fake_host import FakeHost
from tests.unit.test_fleet import fleet, only_problem
from tests.unit.test_push import BUILDER, NEW, plan


def test_substitute_on_target_is_off_unless_set_and_a_bool(write_inventory):
    specs = check_fleet(write_inventory(fleet(pi={"substitute_on_target": True})))
    assert specs["pi"].substitute_on_target is True
    specs = check_fleet(write_inventory(fleet(), filename="off.py"))
    assert specs["pi"].substitute_on_target is False
    problem = only_problem(
        write_inventory(fleet(pi={"substitute_on_target": "often"}), filename="bad.py")
    )
    assert problem == "pi: substitute_on_target is 'often'; set it to True or False"


def test_the_copy_asks_the_target_to_substitute_first_only_when_set():
    plain = copy_command(NEW, "beau", "10.0.0.2").get_raw_value()
    assert "--substitute-on-destination" not in plain
    assert copy_command(NEW, "beau; id", "10.0.0.2", substitute=True).get_raw_value() == (
        "nix --extra-experimental-features 'nix-command flakes' copy "
        "--substitute-on-destination --option builders-use-substitutes true "
        f"--to 'ssh-ng://beau; id@10.0.0.2' {NEW}"
    )


def _copied_command(monkeypatch: Any, substitute: bool) -> str:
    """The command the copy step runs on the builder, with the closure and room faked."""
    commands: list[str] = []

    def watched(host: Any, command: Any, **kwargs: Any) -> tuple[bool, list[str]]:
        commands.append(command("/tmp/log").get_raw_value())
        return True, []

    monkeypatch.setattr(copy, "run_watched", watched)
    monkeypatch.setattr(copy, "_closure", lambda *a: copy.space.Closure({}))
    monkeypatch.setattr(copy, "_room_problem", lambda *a: None)
    monkeypatch.setattr(copy, "_pin_copy", lambda *a: None)  # the GC root before the copy
    step = copy._copy.__wrapped__  # type: ignore[attr-defined]
    to = copy.Destination("10.0.0.2", 22, "beau", substitute)
    assert step(None, FakeHost("pi4"), plan(), BUILDER, RunCache({}), to) is True
    (command,) = commands
    return command


def test_the_copy_step_passes_the_hosts_choice_on(monkeypatch):
    assert "copy --substitute-on-destination --option" in _copied_command(monkeypatch, True)
    assert "--substitute-on-destination" not in _copied_command(monkeypatch, False)
