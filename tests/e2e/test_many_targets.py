"""
Many targets of one builder on a bench of four Pis, checked on the builder: a wrapper in front
of the NAS's ``nix`` (put first on its PATH for SSH sessions) logs every invocation with its
start, end and arguments. One evaluation and one build per run; a configuration that does not
evaluate, or does not build, fails only its own target; ``max_parallel_copies=1`` copies one at
a time; a slow build shows its progress while it runs.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.bench import fleet
from tests.bench.client import prepare_push, ssh
from tests.e2e.test_pi import (
    current,
    deploy,
    derivation,
    desired_path,
    new_versions,
    output,
)

PIS = ("pi4", "pi5", "pis", "pi6")  # pi6 is armv7l
COUNTER_DIR = "/root/nixpush-nix-counter"
CALLS = "/root/nixpush-nix-calls.log"
WRAPPER = f"""#!/bin/sh
echo "start $$ $(date +%s.%N) $*" >> {CALLS}
/usr/bin/nix "$@"
rc=$?
echo "end $$ $(date +%s.%N) $rc" >> {CALLS}
exit $rc
"""


@dataclass(frozen=True)
class Call:
    """One ``nix`` run on the builder."""

    args: str
    start: float
    end: float

    @property
    def command(self) -> str:
        """``eval``, ``build``, ``copy``, ``store``, ``path-info``... (the first one named)."""
        return next((word for word in self.args.split() if word in _COMMANDS), "?")


_COMMANDS = ("eval", "build", "copy", "store", "path-info", "flake")


@pytest.fixture(scope="module")
def four_pis(push_ready: None) -> Iterator[None]:
    """Four Pis (one armv7l) on the NAS, prepared as a user would; the default fleet after,
    prepared again, as the session's ``push_ready`` found it (the NAS emulates no armv7l)."""
    default = len(fleet.PIS)
    fleet.up(pis=4)
    prepare_push()  # the NAS emulates armv7l for pi6; push keys for the new Pi
    yield
    fleet.set_library_weight("light")
    fleet.up(pis=default)
    prepare_push()


@pytest.fixture
def counted(four_pis: None) -> Iterator[None]:
    """Every ``nix`` the NAS runs over SSH goes through the counting wrapper."""
    nas = fleet.host(fleet.BUILDER)
    before = fleet.sshd_options(nas).get("PermitUserEnvironment", "no")
    script = (
        f"mkdir -p {COUNTER_DIR} && cat > {COUNTER_DIR}/nix && chmod 0755 {COUNTER_DIR}/nix && "
        f"echo PATH={COUNTER_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        " > /root/.ssh/environment"
    )
    fleet.run(fleet.in_host(nas, ["sh", "-c", script]), input=WRAPPER)
    fleet.set_sshd_option(nas, "PermitUserEnvironment", "yes")
    without_knobs()
    yield
    without_knobs()
    fleet.set_sshd_option(nas, "PermitUserEnvironment", before)
    fleet.run(fleet.in_host(nas, ["rm", "-rf", COUNTER_DIR, "/root/.ssh/environment", CALLS]))


KNOBS = ("failEval", "failBuild", "slowBuild", "padding")


def without_knobs() -> None:
    """The Pis' configurations without the test flake's failure and slowness knobs."""
    configs = fleet.flake_configs()
    for pi in PIS:
        configs[pi] = {k: v for k, v in configs[pi].items() if k not in KNOBS}
    fleet.set_flake_configs(configs)


def calls() -> list[Call]:
    """The NAS's ``nix`` runs so far (through the wrapper), and clear the log."""
    text = ssh("nas", f"cat {CALLS} 2>/dev/null; rm -f {CALLS}", check=False).stdout
    starts: dict[str, tuple[float, str]] = {}
    done = []
    for line in text.splitlines():
        kind, pid, when, *rest = line.split(" ", 3)
        if kind == "start":
            starts[pid] = (float(when), rest[0] if rest else "")
        elif pid in starts:
            start, args = starts.pop(pid)
            done.append(Call(args, start, float(when)))
    return done


def of(kind: str, runs: list[Call]) -> list[Call]:
    return [call for call in runs if call.command == kind]


def test_the_wrapper_sees_the_nas_nix(counted):
    calls()
    ssh("nas", "nix --extra-experimental-features nix-command eval --expr 1")
    assert [c.command for c in calls()] == ["eval"]


def test_one_evaluation_and_one_build_for_four_pis_and_limit_evaluates_only_its_pis(counted):
    fleet.set_library_weight("heavy")
    new_versions(*PIS)
    wanted = {pi: desired_path(pi) for pi in PIS}
    calls()

    result = deploy()

    runs = calls()
    assert result.returncode == 0, output(result)
    assert {pi: current(pi) for pi in PIS} == wanted
    assert len(of("eval", runs)) == 1, [c.args[:200] for c in of("eval", runs)]
    assert len(of("build", runs)) == 1
    built = shlex.split(of("build", runs)[0].args)
    # Every Pi's toplevel in that one build (the NAS and the desktop may be in it too).
    assert {derivation(pi) for pi in PIS} <= {arg for arg in built if arg.endswith(".drv")}

    new_versions(*PIS)
    calls()  # the test's own evaluations above
    limited = deploy("--limit", "pi4", "--limit", "pi6")

    runs = calls()
    assert limited.returncode == 0, output(limited)
    evaluations = of("eval", runs)
    assert len(evaluations) == 1, [c.args[-400:] for c in evaluations]
    (evaluation,) = evaluations
    assert "pi4" in evaluation.args and "pi6" in evaluation.args
    assert "pi5" not in evaluation.args and "pis" not in evaluation.args
    assert len(of("build", runs)) == 1


def test_a_run_with_nothing_changed_evaluates_nothing_and_a_moved_target_evaluates(counted):
    new_versions(*PIS)
    first = deploy()
    assert first.returncode == 0, output(first)
    calls()

    again = deploy()

    runs = calls()
    assert again.returncode == 0, output(again)
    work = [c.args[:200] for c in runs if c.command in ("eval", "build", "copy", "store")]
    assert work == []
    assert all(f"{pi} already runs" in output(again) for pi in PIS), output(again)

    # pi5 back on its previous system (by hand, as it were): the remembered answer does not
    # match it, so the run evaluates afresh and puts pi5 back.
    wanted = current("pi5")
    back = deploy("--limit", "pi5", "--data", "deploy_action=rollback")
    assert back.returncode == 0 and current("pi5") != wanted, output(back)
    calls()
    moved = deploy()
    runs = calls()
    assert moved.returncode == 0, output(moved)
    assert len(of("eval", runs)) == 1 and current("pi5") == wanted

    # The flake changed: its new state is evaluated once.
    new_versions("pi4")
    calls()
    changed = deploy()
    runs = calls()
    assert changed.returncode == 0, output(changed)
    assert len(of("eval", runs)) == 1 and current("pi4") == desired_path("pi4")


@pytest.mark.parametrize(
    ("how", "nix_says"),
    [
        ("missing", "attribute 'noSuchOption' missing"),
        ("throw", "bench: pi5 fails to evaluate (failEval)"),
    ],
)
def test_a_configuration_that_fails_to_evaluate_fails_only_its_target(counted, how, nix_says):
    new_versions(*PIS)
    new_versions("pi5", failEval=how)
    others = [pi for pi in PIS if pi != "pi5"]
    wanted = {pi: desired_path(pi) for pi in others}
    before = current("pi5")
    calls()  # the test's own evaluations above

    result = deploy()

    text = output(result)
    assert result.returncode == 1, text
    assert re.search(rf"pi5: failed: nas cannot evaluate \S+pi5\S*: .*{re.escape(nix_says)}", text)
    assert {pi: current(pi) for pi in others} == wanted, text
    assert current("pi5") == before
    assert "Traceback" not in text
    assert len(of("build", calls())) == 1


def test_a_configuration_that_fails_to_build_fails_only_its_target(counted):
    new_versions(*PIS)
    new_versions("pi6", failBuild=True)
    others = [pi for pi in PIS if pi != "pi6"]
    wanted = {pi: desired_path(pi) for pi in others}
    before = current("pi6")
    calls()

    result = deploy()

    text = output(result)
    runs = calls()
    assert result.returncode == 1, text
    assert re.search(r"pi6: failed: building \S+ on nas failed: builder for '\S+pi6\S+\.drv' "
                     r"failed with exit code 3", text), text  # fmt: skip
    assert {pi: current(pi) for pi in others} == wanted, text
    assert current("pi6") == before
    assert len(of("build", runs)) == 1 and len(of("eval", runs)) == 1


def test_with_max_parallel_copies_1_copies_never_overlap(counted):
    new_versions(*PIS, padding=True)  # a few MB each, so copies take a while
    wanted = {pi: desired_path(pi) for pi in PIS}
    calls()

    result = deploy("--data", "max_parallel_copies=1")

    assert result.returncode == 0, output(result)
    assert {pi: current(pi) for pi in PIS} == wanted
    copies = sorted(of("copy", calls()), key=lambda c: c.start)
    assert len(copies) == len(PIS)
    for first, second in itertools.pairwise(copies):
        assert first.end <= second.start, (first, second)


def test_a_slow_build_shows_its_progress_while_it_runs(counted):
    new_versions(*PIS)
    new_versions("pi4", slowBuild="24")

    result = deploy()

    text = output(result)
    assert result.returncode == 0, text
    progress = re.findall(
        r"\[nas\] building for [\w, ]+: (\d) of (\d) derivations built(?:, building ([\w, -]+))?"
        r" \((\d+) s\)",
        text,
    )
    assert len(progress) >= 2, text
    seconds = [int(p[3]) for p in progress]
    assert seconds[0] <= 6 and all(b - a <= 10 for a, b in itertools.pairwise(seconds))
    assert any("nixos-system-pi4" in p[2] for p in progress), progress
    assert progress[-1][1] == str(len(PIS))
