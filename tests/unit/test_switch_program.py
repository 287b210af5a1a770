"""
The activation program (operations/push/switch.sh) run for real by ``sh``: a real
``nix-env -p`` on a temporary profile, stand-in systems added to this machine's Nix store whose
``switch-to-configuration`` records what it did, and the program's fixed paths (profile,
/run/current-system, GC roots) pointed into a temporary directory. What each safe-switching
guarantee rests on: the host's lock, deadlines on the time since boot, nothing that survives
a reboot pointing at an unconfirmed system, rollbacks removing only their own generation, a
truncated program running nothing, GC roots for the run's systems.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.command import QuoteString, StringCommand

from operations.core.models import Safety
from operations.push import switch
from operations.push.switch import ActivationRun, LinksAndPending

pytestmark = pytest.mark.skipif(
    shutil.which("nix-store") is None or os.geteuid() != 0,
    reason="needs this machine's Nix store, as root",
)

# switch-to-configuration of a stand-in system: records "<action> <system>" in $LOG, points
# $RUNNING at the system for switch/test and writes it to $BOOT for switch/boot, like NixOS;
# a file fail-<action> in the system makes that action exit 4.
STC = r"""#!/bin/sh
top=${0%/bin/switch-to-configuration}
echo "$1 $top" >> "$LOG"
if [ -e "$top/fail-$1" ]; then echo "failing $1"; exit 4; fi
case $1 in switch|test) ln -sfn "$top" "$RUNNING" ;; esac
case $1 in switch|boot) echo "$top" > "$BOOT" ;; esac
echo "$1: done"
"""


def stand_in_system(tmp_path: Path, name: str, *fails: str) -> str:
    """A system in the Nix store (unique per test) whose actions ``fails`` exit 4."""
    source = tmp_path / "systems" / name
    (source / "bin").mkdir(parents=True)
    (source / "id").write_text(f"{name} {tmp_path}\n")
    stc = source / "bin" / "switch-to-configuration"
    stc.write_text(STC)
    stc.chmod(0o755)
    for action in fails:
        (source / f"fail-{action}").touch()
    added = subprocess.run(
        ["nix-store", "--add", str(source)], capture_output=True, text=True, check=True
    )
    return added.stdout.strip()


@dataclass
class Target:
    """A temporary stand-in for a host: its profile, running link, boot default, run root."""

    root: Path
    program: str = ""
    env: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    def __post_init__(self) -> None:
        for sub in ("profiles", "gcroots", "runs", "fakebin"):
            (self.root / sub).mkdir()
        self.program = switch.PROGRAM
        self.env = {
            **os.environ,
            **paths_env(self.root),
            "PATH": f"{self.root / 'fakebin'}:{os.environ['PATH']}",
            "LOG": str(self.root / "log"),
            "RUNNING": str(self.root / "current-system"),
            "BOOT": str(self.root / "boot-default"),
        }

    @property
    def profile(self) -> Path:
        return self.root / "profiles" / "system"

    def install(self, system: str) -> None:
        """The host as first installed: ``system`` in its profile, running and booted."""
        subprocess.run(["nix-env", "-p", str(self.profile), "--set", system], check=True,
                       capture_output=True)  # fmt: skip
        (self.root / "current-system").symlink_to(system)
        (self.root / "boot-default").write_text(f"{system}\n")

    def running(self) -> str:
        return os.path.realpath(self.root / "current-system")

    def booted(self) -> str:
        return (self.root / "boot-default").read_text().strip()

    def profiled(self) -> str:
        return os.path.realpath(self.profile)

    def generations(self) -> dict[int, str]:
        found = {}
        for link in (self.root / "profiles").glob("system-*-link"):
            found[int(link.name.split("-")[1])] = os.path.realpath(link)
        return found

    def log(self) -> list[str]:
        path = self.root / "log"
        return path.read_text().splitlines() if path.exists() else []

    def start(
        self, new: str, action: str = "switch", *, generation: str = "", rollback: bool = True,
        confirm: int = 30, program: str | None = None, copied: str = "",
    ) -> tuple[subprocess.Popen[str], Path]:  # fmt: skip
        """The program started for a new run (not detached: the test holds it)."""
        self.runs += 1
        run_dir = self.root / "runs" / f"run{self.runs}"
        run_dir.mkdir(mode=0o700)
        (run_dir / "program").write_text(self.program if program is None else program)
        args = [str(run_dir), action, new, generation, "1" if rollback else "0", str(confirm),
                "60", f"tester@here pid {os.getpid()}", copied]  # fmt: skip
        process = subprocess.Popen(
            ["sh", str(run_dir / "program"), *args], env=self.env, text=True,
            stdout=(run_dir / "output").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        return process, run_dir


def paths_env(root: Path) -> dict[str, str]:
    """The programs' fixed paths (profile, /run/current-system, GC roots) moved into ``root``."""
    return {
        "NIXPUSH_PROFILE": str(root / "profiles" / "system"),
        "NIXPUSH_RUNNING": str(root / "current-system"),
        "NIXPUSH_GCROOTS": str(root / "gcroots"),
    }


def state_of(run_dir: Path) -> str:
    status = run_dir / "status"
    if not status.exists():
        return ""
    lines = [x for x in status.read_text().splitlines() if x.startswith("state=")]
    return lines[0].removeprefix("state=") if lines else ""


def wait_for(run_dir: Path, *states: str, timeout: float = 15) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if state_of(run_dir) in states:
            return time.monotonic() - started
        time.sleep(0.05)
    output = (run_dir / "output").read_text()
    raise AssertionError(f"never {states}: {state_of(run_dir)!r}\n{output}")


def confirm(run_dir: Path) -> None:
    (run_dir / "awaiting").rename(run_dir / "confirmed")


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    host = Target(tmp_path)
    yield host


@pytest.fixture
def systems(tmp_path: Path) -> dict[str, str]:
    return {
        "A": stand_in_system(tmp_path, "A"),
        "B": stand_in_system(tmp_path, "B"),
        "B-no-boot": stand_in_system(tmp_path, "B-no-boot", "boot"),
    }


# -- 3. nothing that survives a reboot points at an unconfirmed system ------------------


def test_switch_activates_as_test_and_moves_profile_and_boot_only_once_confirmed(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    assert target.running() == b
    assert target.profiled() == a and target.booted() == a  # a reboot now comes back on A
    assert target.log() == [f"test {b}"]
    confirm(run_dir)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "confirmed", (run_dir / "output").read_text()
    assert target.running() == b and target.profiled() == b and target.booted() == b
    assert target.log() == [f"test {b}", f"boot {b}"]
    assert target.generations() == {1: a, 2: b}


def test_killed_in_the_window_the_profile_and_boot_default_still_name_the_old_system(
    target, systems
):
    # A power cut in the window: the program dies, /run is gone. What survives is the old.
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=5)
    assert target.profiled() == a and target.booted() == a
    assert target.generations() == {1: a}


def test_unconfirmed_switch_rolls_back_without_touching_profile_or_boot(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b, confirm=1)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "rolled-back"
    assert target.running() == a and target.profiled() == a and target.booted() == a
    assert target.log() == [f"test {b}", f"test {a}"]
    assert target.generations() == {1: a}


def test_without_rollback_switch_is_a_plain_switch(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b, rollback=False)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "done"
    assert target.log() == [f"switch {b}"]
    assert target.profiled() == b and target.booted() == b


def test_boot_sets_profile_and_boot_default_only(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b, "boot", rollback=False)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "done"
    assert target.running() == a and target.profiled() == b and target.booted() == b


# -- 4. a rollback removes only what its run created -------------------------------------


def test_a_failed_commit_restores_the_old_boot_default_and_deletes_its_new_generation(
    target, systems
):
    a, b = systems["A"], systems["B-no-boot"]
    target.install(a)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    confirm(run_dir)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "rolled-back"
    assert "boot exited 4" in (run_dir / "status").read_text()
    assert target.running() == a and target.profiled() == a and target.booted() == a
    assert target.generations() == {1: a}  # the generation it created is gone


def test_a_rollback_keeps_a_generation_it_did_not_create(target, systems):
    # Generation 1 = A (current), generation 2 = B from before: `nix-env --set B` reuses
    # generation 2, which is not this run's to delete.
    a, b = systems["A"], systems["B-no-boot"]
    target.install(a)
    subprocess.run(["nix-env", "-p", str(target.profile), "--set", b], check=True)
    subprocess.run(["nix-env", "-p", str(target.profile), "--switch-generation", "1"],
                   check=True, capture_output=True)  # fmt: skip
    assert target.generations() == {1: a, 2: b} and target.profiled() == a
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    confirm(run_dir)
    assert process.wait(timeout=15) == 0
    assert state_of(run_dir) == "rolled-back"
    assert target.profiled() == a
    assert target.generations() == {1: a, 2: b}


# -- 2. deadlines on a clock that never jumps -------------------------------------------


@pytest.mark.parametrize("step", [3600, -3600])
def test_a_wall_clock_step_does_not_move_the_confirmation_deadline(target, systems, step):
    # A `date` first on PATH answers an hour ahead (or behind): NTP stepping a Pi's clock.
    real = shutil.which("date")
    fake = target.root / "fakebin" / "date"
    fake.write_text(
        f'#!/bin/sh\ncase "$*" in *%s*) echo $(( $({real} +%s) + ({step}) )) ;; '
        f'*) exec {real} "$@" ;; esac\n'
    )
    fake.chmod(0o755)
    assert int(subprocess.check_output(["date", "+%s"], env=target.env)) - time.time() == (
        pytest.approx(step, abs=5)
    )
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b, confirm=3)
    wait_for(run_dir, "awaiting-confirmation")
    took = wait_for(run_dir, "rolled-back", "rolling-back", timeout=20)
    process.wait(timeout=15)
    assert 1.5 < took < 6, took  # the 3 s window, neither cut short nor stretched
    assert state_of(run_dir) == "rolled-back" and target.running() == a


# -- 1. one activation per host ----------------------------------------------------------


def test_a_second_program_fails_naming_the_pending_one_and_changes_nothing(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    first, first_dir = target.start(b)
    wait_for(first_dir, "awaiting-confirmation")
    holder = (target.root / "runs" / "lock").read_text()
    assert "id=run1\n" in holder and f"controller=tester@here pid {os.getpid()}\n" in holder
    second, second_dir = target.start(a)
    assert second.wait(timeout=15) == 0
    status = (second_dir / "status").read_text()
    assert "state=failed" in status and "another activation is pending" in status
    assert "id=run1" in status
    assert target.log() == [f"test {b}"]  # the second changed nothing
    confirm(first_dir)
    assert first.wait(timeout=15) == 0
    assert (target.root / "runs" / "lock").read_text() == ""  # released, nobody named


def launch(
    target: Target,
    run_id: str,
    wait: int,
    program: str,
    starter: list[Any] | None = None,
    handover: str = "0",
) -> subprocess.CompletedProcess[str]:
    """The real launch command (lock wait ``wait`` s, ``program`` on stdin) with a stand-in
    starter that only says it started (and writes a pid file, as the program does first)."""
    run_dir = target.root / "runs" / run_id
    stand_in = [
        "sh",
        "-c",
        QuoteString('echo started; echo "$$" > "$0/pid"'),
        QuoteString(str(run_dir)),
    ]
    command = StringCommand(
        "sh", "-c", QuoteString(switch.INSTALL), "nixpush-launch", QuoteString(str(run_dir)),
        switch.PROGRAM_SHA256, str(wait), "tester@here", handover, *(starter or stand_in),
    )  # fmt: skip
    return subprocess.run(
        ["sh", "-c", command.get_raw_value()], input=program, capture_output=True, text=True,
        timeout=30, env=target.env,
    )  # fmt: skip


def test_a_launch_waits_for_the_pending_run_then_gives_up_naming_it(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    first, first_dir = target.start(b)
    wait_for(first_dir, "awaiting-confirmation")
    started = time.monotonic()
    done = launch(target, "second", 2, switch.PROGRAM)
    assert 1.5 < time.monotonic() - started < 6
    assert done.returncode == 3
    lines = done.stdout.splitlines()
    _, holder = switch.split_at_mark(lines, switch.PENDING_MARK)
    assert holder is not None
    assert switch.pending_activation(holder, held=True) == (
        f"activation run1, started {holder[1].removeprefix('started=')} by tester@here pid "
        f"{os.getpid()}"
    )
    assert not (target.root / "runs" / "second").exists()  # nothing installed
    # Once the pending run ends, a launch goes ahead at once.
    confirm(first_dir)
    first.wait(timeout=15)
    done = launch(target, "third", 2, switch.PROGRAM)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target.root / "runs" / "third" / "output").read_text() == "started\n"


def test_the_planner_reads_the_pending_run_with_the_links(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    read = LinksAndPending().command(lock=str(target.root / "runs" / "lock")).get_raw_value()

    def fact() -> tuple[str | None, str | None, str | None]:
        out = subprocess.run(["sh", "-c", read], capture_output=True, text=True, check=True)
        return LinksAndPending().process(out.stdout.splitlines())

    assert fact()[2] is None  # no lock file: nothing pending
    first, first_dir = target.start(b)
    wait_for(first_dir, "awaiting-confirmation")
    pending = fact()[2]
    assert pending is not None and pending.startswith("activation run1, started ")
    assert pending.endswith(f"by tester@here pid {os.getpid()}")
    first.send_signal(signal.SIGKILL)  # no chance to clear its name
    first.wait(timeout=5)
    assert fact()[2] == f"{pending} (its program is gone: it never finished)"


# -- 5. the program is read whole before anything runs ----------------------------------


def test_a_truncated_program_runs_nothing_wherever_it_is_cut(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    program = target.program
    call = program.rindex("nixpush_switch")  # the last line: nixpush_switch "$@"
    whole = len(program.rstrip("\n"))
    cuts = sorted({*range(0, whole, 211), *range(call - 3, whole)})
    for cut in cuts:
        process, run_dir = target.start(b, rollback=False, program=program[:cut])
        process.wait(timeout=15)
        assert not (run_dir / "status").exists(), f"cut at {cut} ran: {program[cut - 80 : cut]!r}"
    assert target.log() == [] and target.running() == a


def test_a_launch_with_a_truncated_upload_starts_nothing(target):
    done = launch(target, "cut", 1, switch.PROGRAM[: len(switch.PROGRAM) // 2])
    assert done.returncode == 3
    assert "the program arrived cut short" in done.stdout
    assert not (target.root / "runs" / "cut").exists()


# -- 7. GC roots ---------------------------------------------------------------------------


def test_the_runs_systems_are_gc_roots_until_it_ends(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    stale = target.root / "gcroots" / "nixpush-killed-long-ago"
    stale.mkdir()
    (stale / "new").symlink_to(a)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    roots = target.root / "gcroots" / f"nixpush-{run_dir.name}"
    assert {p.name: os.readlink(p) for p in roots.iterdir()} == {
        "previous": a, "previous-profile": a, "new": b,
    }  # fmt: skip
    assert not stale.exists()  # a run that is not alive (the lock says so) pins nothing
    confirm(run_dir)
    process.wait(timeout=15)
    assert list((target.root / "gcroots").iterdir()) == []


def test_an_activation_program_args_carry_the_controller():
    run = ActivationRun(
        id="x", action="switch", desired="/nix/store/b", generation=None, safety=Safety(),
        systemd=False, controller="me@box pid 1",
    )  # fmt: skip
    assert [a.obj for a in switch.program_args(run)][-2:] == ["me@box pid 1", ""]
    assert run.lock_wait == Safety().confirm_timeout + Safety().activation_timeout


# -- a stop inside the window rolls back -------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_awaiting_confirmation_rolls_back(target, systems, signum):
    a, b = systems["A"], systems["B"]
    target.install(a)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    process.send_signal(signum)
    assert process.wait(timeout=15) == 0
    status = (run_dir / "status").read_text()
    assert state_of(run_dir) == "rolled-back", status
    assert "cause=the activation program was stopped (a signal) while awaiting-confirmation" in (
        status
    )
    assert target.running() == a and target.profiled() == a and target.booted() == a
    assert not (run_dir / "awaiting").exists()  # a confirmation now is too late
    assert target.generations() == {1: a}


def test_a_stop_while_committing_restores_the_profile_and_boot_default(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    slow = target.root / "fakebin" / "nix-env"
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec {shutil.which("nix-env")} "$@"\n')
    slow.chmod(0o755)
    process, run_dir = target.start(b)
    wait_for(run_dir, "awaiting-confirmation")
    confirm(run_dir)
    wait_for(run_dir, "committing")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert state_of(run_dir) == "rolled-back", (run_dir / "output").read_text()
    assert target.running() == a and target.profiled() == a and target.booted() == a


def test_a_stop_with_rollback_off_fails_and_leaves_the_new_system(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    # A slow activation (`timeout` first on PATH sleeps first): time to stop it.
    slow = target.root / "fakebin" / "timeout"
    slow.write_text('#!/bin/sh\nshift\nsleep 3\nexec "$@"\n')
    slow.chmod(0o755)
    process, run_dir = target.start(b, rollback=False)
    wait_for(run_dir, "activating")
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    status = (run_dir / "status").read_text()
    assert state_of(run_dir) == "failed" and "stopped (a signal) while activating" in status
    assert target.running() == b  # rollback off: what it did stays


# -- one lock from the launch's look to the program; the copy's GC root -------------------


def program_starter(target: Target, run_id: str, new: str, *, inherit: bool) -> list[Any]:
    """A starter for the real program in the background: keeping the launch's descriptor of
    the lock (as ``setsid -f`` does), or closing it (as a systemd unit gets none)."""
    run_dir = target.root / "runs" / run_id
    args = [str(run_dir), "switch", new, "", "1", "30", "60", "tester@here", ""]
    close = "" if inherit else "exec 9>&-; "
    script = f'{close}sh "$0/program" "$@" </dev/null >"$0/output" 2>&1 &'
    return ["sh", "-c", QuoteString(script), *(QuoteString(a) for a in [str(run_dir), *args])]


def holder(target: Target) -> dict[str, str]:
    lines = (target.root / "runs" / "lock").read_text().splitlines()
    return dict(line.partition("=")[::2] for line in lines)


def lock_is_free(target: Target) -> bool:
    lock = target.root / "runs" / "lock"
    return subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode == 0


def test_a_launch_holds_the_lock_from_its_look_to_the_start(target):
    # The first launch's starter takes a second: the lock stays held all along, so a second
    # launch looking meanwhile finds it taken (it used to find it free between the look and
    # the program's own flock, and both passed).
    run_dir = target.root / "runs" / "first"
    slow = ["sh", "-c", QuoteString('sleep 1; echo "$$" > "$0/pid"'), QuoteString(str(run_dir))]
    with subprocess.Popen(
        ["sh", "-c", StringCommand(
            "sh", "-c", QuoteString(switch.INSTALL), "nixpush-launch", QuoteString(str(run_dir)),
            switch.PROGRAM_SHA256, "5", "me@first", "0", *slow,
        ).get_raw_value()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=target.env,
    ) as first:  # fmt: skip
        assert first.stdin is not None
        first.stdin.write(switch.PROGRAM)
        first.stdin.close()
        deadline = time.monotonic() + 10
        while not (run_dir / "program").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        named = holder(target)  # the launch itself (pid: its shell), handing over
        assert named == {
            "id": "first", "started": named["started"], "controller": "me@first",
            "pid": named["pid"], "handover": "1",
        }  # fmt: skip
        second = launch(target, "second", 0, switch.PROGRAM)
        assert second.returncode == 3
        _, pending = switch.split_at_mark(second.stdout.splitlines(), switch.PENDING_MARK)
        assert pending is not None
        assert switch.pending_activation(pending, held=True).startswith("activation first, ")
        assert first.wait(timeout=15) == 0
    assert not (target.root / "runs" / "second").exists()


def test_a_lock_handed_to_a_live_program_counts_as_held(target):
    # What a launch leaves between its end and a systemd unit's flock: the holder marked
    # handover=1, naming a run whose program runs. Whoever takes the lock then lets go.
    ghost = target.root / "runs" / "ghost"
    ghost.mkdir()
    (target.root / "runs" / "lock").write_text("id=ghost\nstarted=x\ncontroller=c\nhandover=1\n")
    with subprocess.Popen(["sleep", "30"]) as alive:
        (ghost / "pid").write_text(f"{alive.pid}\n")
        refused = launch(target, "second", 1, switch.PROGRAM)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert switch.PENDING_MARK in refused.stdout and "id=ghost" in refused.stdout
        alive.kill()
    # Its program is gone: the handover is stale, and the launch goes ahead.
    done = launch(target, "third", 1, switch.PROGRAM)
    assert done.returncode == 0, done.stdout + done.stderr
    assert holder(target)["id"] == "third"


@pytest.mark.parametrize("inherit", [True, False], ids=["setsid", "systemd-unit"])
def test_the_program_takes_the_lock_over_from_the_launch(target, systems, inherit):
    a, b = systems["A"], systems["B"]
    target.install(a)
    starter = program_starter(target, "run", b, inherit=inherit)
    done = launch(target, "run", 5, switch.PROGRAM, starter, handover="0" if inherit else "1")
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = target.root / "runs" / "run"
    if inherit:  # the program holds the launch's descriptor: the lock is never free
        assert not lock_is_free(target)
    wait_for(run_dir, "awaiting-confirmation")
    pid = (run_dir / "pid").read_text().strip()
    assert holder(target) == {
        "id": "run", "started": holder(target)["started"], "controller": "tester@here",
        "pid": pid,
    }  # fmt: skip
    assert not lock_is_free(target)
    confirm(run_dir)
    wait_for(run_dir, "confirmed")
    assert target.running() == b and target.profiled() == b


def test_the_copys_gc_root_lasts_until_the_program_pins_the_system(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    copies = target.root / "gcroots" / "nixpush-copied"
    copies.mkdir()
    for name, system in (("mine", b), ("another-controllers", a), ("a-day-old", a)):
        (copies / name).symlink_to(system)
    two_days_ago = time.time() - 2 * 86400
    os.utime(copies / "a-day-old", (two_days_ago, two_days_ago), follow_symlinks=False)
    stale = target.root / "gcroots" / "nixpush-killed-long-ago"
    stale.mkdir()
    process, run_dir = target.start(b, copied="mine")
    wait_for(run_dir, "awaiting-confirmation")
    roots = target.root / "gcroots" / f"nixpush-{run_dir.name}"
    assert os.readlink(roots / "new") == b  # pinned by the run, then the copy's root went
    assert sorted(p.name for p in copies.iterdir()) == ["another-controllers"]
    assert not stale.exists()  # a dead run's roots go, the copies' directory stays
    confirm(run_dir)
    assert process.wait(timeout=15) == 0
    assert sorted(p.name for p in (target.root / "gcroots").iterdir()) == ["nixpush-copied"]


def test_a_copied_name_with_a_slash_removes_nothing(target, systems):
    a, b = systems["A"], systems["B"]
    target.install(a)
    (target.root / "gcroots" / "keep").symlink_to(a)
    process, _ = target.start(b, copied="../keep", rollback=False)
    assert process.wait(timeout=15) == 0
    assert (target.root / "gcroots" / "keep").is_symlink()


def test_the_scripts_that_take_the_lock_share_one_handed_over():
    from operations.push import prune

    def function(text: str) -> list[str]:
        lines = [line.strip() for line in text.splitlines()]
        start = lines.index("handed_over() {")
        return lines[start : lines.index("}", start) + 1]

    install = function(switch.INSTALL)
    assert function(switch.PROGRAM) == install and function(prune.PROGRAM) == install


def test_the_copy_root_is_per_controller_and_system_and_its_command_quotes():
    hostile = "/nix/store/x-a b; touch /tmp/pwned"
    name = switch.copy_root_name(hostile)
    assert len(name) == 32 and name == switch.copy_root_name(hostile)
    assert name != switch.copy_root_name("/nix/store/y")
    command = switch.pin_copy_command(hostile).get_raw_value()
    assert shlex.split(command) == [
        "mkdir", "-p", switch.COPIED_ROOTS, "&&", "ln", "-sfn", hostile,
        f"{switch.COPIED_ROOTS}/{name}",
    ]  # fmt: skip
