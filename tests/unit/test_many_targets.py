"""Many targets of one builder: the batched evaluation expression and its parsing, the one-build and
copy commands, and reading progress from Nix's internal-json log."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import gevent
import pytest

from operations.core.nixexpr import nix_string
from operations.push.commands import (
    INVALID_MARK,
    RUNNING_MARK,
    TIMED_OUT_MARK,
    Evaluated,
    batch_eval_command,
    batch_eval_expression,
    build_all_command,
    build_progress,
    copy_progress,
    failure_for,
    logged,
    missing_outputs_command,
    not_built,
    parse_batch_eval,
    plain_output,
)
from operations.push.progress import report_progress
from operations.push.space import parse_closure

HOSTILE = [
    "pi4",
    'a"b',
    'x${builtins.abort "pwned"}',
    "back\\slash",
    "new\nline",
    "tab\tand 'quote'",
    "$(reboot); `id`",
    "ünïcode ☃",
    "",
    # Every way a dollar sign meets the escapes: alone, doubled, before the closing quote,
    # before an escaped interpolation, after a backslash, in an indented-string quote.
    "a$",
    "$${builtins.abort x}",
    "$$$${x}",
    "\\${x}",
    "$\\",
    "''${x}",
]


def _nix_eval(expression: str) -> object:
    """Evaluate ``expression`` with the machine's Nix (no store, no daemon needed)."""
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(result.stdout)


needs_nix = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None, reason="needs the machine's Nix"
)


@needs_nix
@pytest.mark.parametrize("text", HOSTILE)
def test_nix_string_round_trips_hostile_text_through_real_nix(text):
    assert _nix_eval(nix_string(text)) == text


@needs_nix
def test_batch_expression_answers_every_name_even_hostile_ones_and_never_runs_them():
    # A stand-in for nixosConfigurations: every kind of answer the expression gives.
    configurations = (
        "{ "
        + " ".join(
            f"{nix_string(name)}.config.system.build.toplevel = "
            f'{{ outPath = "/nix/store/{i}-out"; drvPath = "/nix/store/{i}.drv"; }};'
            for i, name in enumerate(HOSTILE)
        )
        + ' threw.config.system.build.toplevel = throw "no"; }'
    )
    names = [*HOSTILE, "threw", "absent"]
    answer = _nix_eval(f"({batch_eval_expression(names)}) {configurations}")

    parsed = parse_batch_eval([json.dumps(answer)])

    assert parsed is not None
    assert parsed == {
        **{
            name: Evaluated(f"/nix/store/{i}-out", f"/nix/store/{i}.drv")
            for i, name in enumerate(HOSTILE)
        },
        "threw": "threw",
        "absent": "missing",
    }


def test_batch_command_is_one_nix_eval_with_the_expression_as_one_quoted_argument():
    names = ['a"; rm -rf /', "pi4"]
    command = batch_eval_command("path:/f lake", names).get_raw_value()

    assert shlex.split(command) == [
        "nix", "--extra-experimental-features", "nix-command flakes", "eval", "--json",
        "path:/f lake#nixosConfigurations", "--apply", batch_eval_expression(names),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], None),
        (["error: attribute 'noSuchOption' missing"], None),
        (["warning: Git tree is dirty", '{"pi4":{"error":"threw"}}'], {"pi4": "threw"}),
        (['{"pi4":{"path":"/nix/store/p","drv":"/nix/store/d.drv"}}'],
         {"pi4": Evaluated("/nix/store/p", "/nix/store/d.drv")}),
        (['{"pi4": 3}'], None),
        (["[1, 2]"], None),
        (["{not json"], None),
    ],
)  # fmt: skip
def test_batch_answer_parsing(lines, expected):
    assert parse_batch_eval(lines) == expected


def test_one_build_of_every_derivation_keeps_going_and_then_lists_what_is_missing():
    command = logged(
        build_all_command(["/nix/store/a.drv", "path:/f#x y"]),
        "/tmp/nixpush-1.log",
        600,
        then=missing_outputs_command(["/nix/store/a"]),
    ).get_raw_value()

    assert "timeout --kill-after=10 600 nix " in command
    assert " build --no-link --keep-going /nix/store/a.drv 'path:/f#x y' " in command
    assert "--log-format internal-json 2> /tmp/nixpush-1.log" in command
    assert command.index("--print-invalid /nix/store/a") > command.index("rm -f /tmp/nixpush")
    assert command.startswith("umask 077; set -C;") and command.endswith("exit $rc")


def test_what_a_build_left_unbuilt_and_why():
    drv = "/nix/store/1mq-nixos-system-pi5-1.drv"
    msg = {"action": "msg", "level": 0, "msg": f"\x1b[31;1merror:\x1b[0m builder for '{drv}' "
           "failed with exit code 3"}  # fmt: skip
    lines = ["@nix " + json.dumps(msg), INVALID_MARK, "/nix/store/yyy-nixos-system-pi5-1"]

    assert not_built(lines) == {"/nix/store/yyy-nixos-system-pi5-1"}
    assert not_built([INVALID_MARK]) == set()
    assert not_built(["error: cannot connect"]) is None
    assert failure_for(drv, lines) == f"builder for '{drv}' failed with exit code 3"
    assert failure_for("/nix/store/other.drv", lines) is None
    assert plain_output(["ssh: connect refused", "@nix " + json.dumps(msg), TIMED_OUT_MARK]) == [
        "ssh: connect refused",
        f"error: builder for '{drv}' failed with exit code 3",
        TIMED_OUT_MARK,
    ]


def _entry(**fields: object) -> str:
    return "@nix " + json.dumps(fields)


def test_build_progress_counts_derivations_and_names_the_running_ones():
    lines = [
        _entry(action="start", id=1, type=104, text=""),
        _entry(action="result", id=1, type=105, fields=[0, 2, 0, 0]),
        _entry(action="start", id=2, type=105, fields=["/nix/store/aaa-nixos-system-pi4-6.drv"]),
        _entry(action="start", id=3, type=105, fields=["/nix/store/bbb-nixos-system-pi5-6.drv"]),
        _entry(action="result", id=1, type=105, fields=[1, 2, 1, 0]),
        f"{RUNNING_MARK} /nix/store/aaa-nixos-system-pi4-6.drv",
    ]

    assert build_progress(lines) == "1 of 2 derivations built, building nixos-system-pi4-6"
    assert build_progress(lines[:2]) == "0 of 2 derivations built"
    assert build_progress(lines[:1]) is None
    failed = [*lines[:-1], _entry(action="result", id=1, type=105, fields=[1, 2, 0, 1])]
    assert build_progress(failed).startswith("1 of 2 derivations built, 1 failed")


def test_copy_progress_counts_paths_and_bytes():
    pi4, bb = "/nix/store/aaa-nixos-system-pi4-6", "/nix/store/bbb-aarch64"
    lines = [
        _entry(action="start", id=9, type=103, text="copying 2 paths"),
        _entry(action="start", id=10, type=100, fields=[bb, "local", "ssh-ng://x"]),
        _entry(action="stop", id=10),
        _entry(action="start", id=11, type=100, fields=[pi4, "local", "ssh-ng://x"]),
    ]
    closure = parse_closure([json.dumps([{"path": bb, "narSize": 2**20}, {"path": pi4,
                                          "narSize": 3 * 2**20}])])  # fmt: skip
    assert closure is not None
    sizes = closure.sizes

    assert copy_progress(lines, sizes) == (
        "1 of 2 paths, 1.0 of 4.0 MiB, copying nixos-system-pi4-6"
    )
    assert copy_progress(lines, {}) == "1 of 2 paths, copying nixos-system-pi4-6"
    assert copy_progress(lines[1:], sizes) is None
    assert parse_closure(["error: no"]) is None


def test_a_long_step_reports_at_first_and_then_regularly_and_a_short_one_not_at_all():
    shown: list[str] = []

    def slow() -> tuple[bool, list[str]]:
        gevent.sleep(0.35)
        return True, ["done"]

    result = report_progress(slow, lambda: "1 of 2", shown.append, first=0.1, every=0.1)

    assert result == (True, ["done"])
    assert len(shown) == 3 and all(line.startswith("1 of 2 (") for line in shown)
    shown.clear()
    assert report_progress(lambda: (True, []), lambda: "x", shown.append, first=0.1) == (True, [])
    assert shown == []
