"""
Many targets planning at once on one builder connection: sshd's MaxSessions (10 by default, on
NixOS too) refuses channels beyond it. The bench's NAS allows far more, so these tests lower it
to reproduce the exhaustion with two Pis, and check that nixpush bounds its sessions
(``max_ssh_sessions``), names a lost channel as the cause, and keeps one target's planning bug
to that target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.bench import fleet
from tests.bench.client import REPO
from tests.e2e.test_pi import current, deploy, desired_path, new_versions, output


@pytest.fixture
def nas_max_sessions() -> Iterator[Callable[[int], None]]:
    before = fleet.sshd_options(fleet.host("nas"))["MaxSessions"]
    yield lambda limit: fleet.set_sshd_option("nas", "MaxSessions", str(limit))
    fleet.set_sshd_option("nas", "MaxSessions", before)


def test_sessions_bounded_to_the_builders_max_sessions_pass_ten_runs_in_a_row(
    push_ready, nas_max_sessions
):
    nas_max_sessions(2)
    for _ in range(5):
        new_versions("pi4", "pi5")
        wanted = {name: desired_path(name) for name in ("pi4", "pi5")}

        cold = deploy("--data", "max_ssh_sessions=2")
        assert cold.returncode == 0, output(cold)
        assert {name: current(name) for name in wanted} == wanted
        unchanged = deploy("--data", "max_ssh_sessions=2")
        assert unchanged.returncode == 0, output(unchanged)
        assert "pi4: unchanged" in output(unchanged) and "pi5: unchanged" in output(unchanged)
        for result in (cold, unchanged):
            assert "Traceback" not in output(result)
            assert "ChannelException" not in output(result)


def test_a_refused_channel_is_named_as_the_cause_not_a_missing_key(push_ready, nas_max_sessions):
    # MaxSessions 0: the NAS accepts the connection but no command at all.
    nas_max_sessions(0)
    new_versions("pi4")

    result = deploy()

    text = output(result)
    assert result.returncode == 1, text
    for name in ("pi4", "pi5"):
        assert f"{name}: failed: lost the SSH channel to nas" in text
    assert "while reading its Nix settings" in text
    assert "has no SSH deploy key" not in text and "has no Nix signing key" not in text
    assert "Traceback" not in text


def test_an_exception_while_planning_one_target_fails_that_target_alone(push_ready, tmp_path):
    new_versions("pi4", "pi5")
    wanted = desired_path("pi4")
    before = current("pi5")
    # The deploy a user runs, with a bug injected into pi5's planning.
    buggy = tmp_path / "buggy_pi.py"
    buggy.write_text(
        "from pyinfra import local\n"
        "from operations.push import plan as _plan\n"
        "_real = getattr(_plan, '_real_plan_deploy', _plan.plan_deploy)\n"
        "_plan._real_plan_deploy = _real\n"
        "def _buggy(target, spec, *rest):\n"
        "    if spec.name == 'pi5':\n"
        "        raise KeyError('injected')\n"
        "    return _real(target, spec, *rest)\n"
        "_plan.plan_deploy = _buggy\n"
        f"local.include({str(REPO / 'deploys/pi.py')!r})\n"
    )

    result = deploy_file(str(buggy))

    text = output(result)
    assert result.returncode == 1, text
    assert "pi5: failed: planning pi5 failed: KeyError: 'injected'" in text
    assert "Traceback" not in text
    assert current("pi4") == wanted
    assert current("pi5") == before
    assert all(f"    {h.name}: " in text for h in fleet.HOSTS)  # the summary lists every host


def deploy_file(path: str):  # type: ignore[no-untyped-def]
    from tests.bench import sops as bench_sops
    from tests.bench.client import BENCH_INVENTORY, pyinfra

    return pyinfra("-y", BENCH_INVENTORY, path, env=bench_sops.env())
