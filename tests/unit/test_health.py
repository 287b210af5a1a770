"""Health checks without a fleet: parsing, merging across roots, commands, retries."""

from __future__ import annotations

import base64
import http.server
import shlex
import shutil
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from operations.data import health
from operations.data.fleet import FleetError, host_spec
from operations.data.health import HealthCheck, parse_check
from operations.push.health import check_command, check_input, run_checks

PI = ("pi4", {"nix_system": "aarch64-linux"})


def test_parse_each_kind_with_defaults():
    assert parse_check({"command": "true"}) == (
        HealthCheck(name="command true", kind="command", command="true"),
        [],
    )
    units, _ = parse_check({"name": "sshd", "units": "sshd.service", "retries": 0})
    assert units == HealthCheck(name="sshd", kind="units", units=("sshd.service",), retries=0)
    url, _ = parse_check({"url": "http://127.0.0.1:8384/rest/noauth/health", "timeout": 3})
    assert url is not None and (url.kind, url.timeout) == ("url", 3)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({}, "needs exactly one of command, units, url"),
        ({"command": "a", "url": "http://x"}, "needs exactly one of command, units, url"),
        ({"units": ["ssh d"]}, "units is ['ssh d']"),
        ({"url": "file:///etc/shadow"}, "url is 'file:///etc/shadow'"),
        ({"command": "true", "timeout": 0}, "timeout is 0; set it to a whole number from 1"),
        ({"command": "true", "retries": True}, "retries is True"),
        ({"command": "true", "every": 3}, "has unknown fields every"),
    ],
)
def test_bad_entries_say_what_to_fix(entry, problem):
    check, problems = parse_check(entry)
    assert check is None
    assert any(p.startswith(problem) for p in problems), problems


def test_checks_merge_across_roots_and_host_data_overrides(write_inventory):
    inventory = write_inventory(
        {
            "minimal": [PI],
            "network": [("pi4", {"health_checks": [{"name": "sshd", "units": ["x.service"]}]})],
        },
        group_data={
            "minimal": 'health_checks = [{"name": "sshd", "units": ["sshd.service"]}]\n',
            "network": 'health_checks = [{"name": "tailnet", "command": "tailscale status"}]\n',
        },
    )  # fmt: skip
    checks = host_spec(inventory.get_host("pi4")).health_checks
    assert [(c.name, c.units or c.command) for c in checks] == [
        ("sshd", ("x.service",)),
        ("tailnet", "tailscale status"),
    ]


def test_two_roots_defining_one_check_differently_is_an_error(write_inventory):
    inventory = write_inventory(
        {"minimal": [PI], "network": [PI]},
        group_data={
            "minimal": 'health_checks = [{"name": "web", "url": "http://a/"}]\n',
            "network": 'health_checks = [{"name": "web", "url": "http://b/"}]\n',
        },
    )
    with pytest.raises(FleetError) as error:
        host_spec(inventory.get_host("pi4"))
    assert "defines check 'web' differently from group minimal" in error.value.message


def test_commands_quote_hostile_values():
    hostile = "http://x/'; touch /tmp/pwned; echo '"
    command = check_command(HealthCheck(name="w", kind="url", url=hostile, timeout=4))
    args = shlex.split(command.get_raw_value())
    assert args[:2] == ["sh", "-c"] and args[3:] == ["nixpush-health", hostile, "4", "0"]
    units = check_command(HealthCheck(name="u", kind="units", units=("a.service", "b@x.service")))
    assert shlex.split(units.get_raw_value()) == [
        "timeout", "10", "systemctl", "is-active", "--quiet", "--", "a.service", "b@x.service",
    ]  # fmt: skip
    own = check_command(HealthCheck(name="c", kind="command", command="test -e /run/ok && true"))
    assert shlex.split(own.get_raw_value()) == [
        "timeout", "10", "sh", "-c", "test -e /run/ok && true",
    ]  # fmt: skip


def test_run_checks_retries_skips_units_without_systemd_and_names_the_failure():
    answers = iter([(False, ["connection refused"]), (True, []), None, (False, [])])
    calls, logged, slept = [], [], []

    def run(command, timeout, stdin):
        calls.append(command)
        return next(answers)

    checks = [
        HealthCheck(name="sshd", kind="units", units=("sshd.service",)),
        HealthCheck(name="web", kind="url", url="http://127.0.0.1/", retries=1),
        HealthCheck(name="app", kind="command", command="false", retries=1),
    ]
    cause = run_checks(checks, systemd=False, run=run, log=logged.append, sleep=slept.append)
    assert cause == "health check 'app' failed after 2 attempts: failed without output"
    assert len(calls) == 4 and slept == [2.0, 2.0]
    assert (
        logged[0]
        == "health check sshd: units sshd.service active: skipped, the target has no systemd"
    )
    assert logged[1] == "health check web: GET http://127.0.0.1/: passed"


def test_owner_roots_declare_valid_checks():
    # group_data is plain Python: every root's checks parse.
    import importlib

    for root in ("minimal", "common", "network", "main", "work", "gaming", "server"):
        module = importlib.import_module(f"group_data.{root}")
        for entry in getattr(module, "health_checks", []):
            assert parse_check(entry)[1] == [], (root, entry)


# -- credentials in URLs never logged; values checked whole ---------------------

SECRET_URL = "https://monitor:s3cret@127.0.0.1:8443/health?x=1"


def test_a_urls_userinfo_is_never_logged_nor_printed():
    check, problems = parse_check({"url": SECRET_URL, "retries": 0})
    assert problems == [] and check is not None
    assert check.url == SECRET_URL  # what the target fetches
    assert check.name == "url https://***@127.0.0.1:8443/health?x=1"
    assert check.description == (
        "url https://***@127.0.0.1:8443/health?x=1: GET https://***@127.0.0.1:8443/health?x=1"
    )
    command = check_command(check)
    args = shlex.split(command.get_raw_value())
    assert args[-3:] == ["https://127.0.0.1:8443/health?x=1", "10", "1"]  # on stdin: check_input
    assert check_input(check) == 'user = "monitor:s3cret"\n'
    assert "s3cret" not in command.get_raw_value() and "monitor" not in str(command)

    logged: list[str] = []
    answer = (False, [f"wget: server returned error for {SECRET_URL}: HTTP/1.1 500"])
    cause = run_checks([check], systemd=True, run=lambda c, t, s: answer, log=logged.append)
    assert cause is not None and "s3cret" not in cause and "monitor" not in cause
    assert cause.endswith("for https://***@127.0.0.1:8443/health?x=1: HTTP/1.1 500")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1/", "http://127.0.0.1/"),
        ("http://user@host/x", "http://***@host/x"),
        ("http://a:b@c@host:80/p?q=@", "http://***@host:80/p?q=@"),
    ],
)
def test_redacted_urls(url, shown):
    assert health.redacted(url) == shown


@pytest.mark.parametrize(
    "entry",
    [{"url": "http://127.0.0.1/\n"}, {"units": "sshd.service\n"}, {"units": ["a.service\n"]}],
)
def test_values_with_a_trailing_newline_are_refused(entry):
    check, problems = parse_check({"name": "named", **entry})
    assert check is None and len(problems) == 1, problems
    assert problems[0].startswith(("url is ", "units is "))


# -- a URL's credentials reach curl on stdin, never a command line ------------------------

# Every character curl's config or a URL could trip on: quotes, backslashes, colons, @, %.
HOSTILE_USER, HOSTILE_PASSWORD = 'mon "it" or', 'p\\a"s:s@w%rd $(id)'


def _fetch(args: list[str], stdin: str, env: dict[str, str] | None = None):
    import subprocess

    from operations.push.health import _FETCH

    return subprocess.run(
        ["/bin/sh", "-c", _FETCH, "nixpush-health", *args],
        input=stdin, capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_credentials_reach_curl_on_stdin_and_no_command_line():
    seen: dict[str, object] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # While curl waits for this answer: every command line on the machine.
            lines = []
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue
            seen["cmdlines"] = lines
            seen["authorization"] = self.headers.get("Authorization")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        quoted = f"{quote(HOSTILE_USER, safe='')}:{quote(HOSTILE_PASSWORD, safe='')}"
        url = f"http://{quoted}@127.0.0.1:{server.server_port}/health"
        check = HealthCheck(name="web", kind="url", url=url, timeout=5)
        args = shlex.split(check_command(check).get_raw_value())[4:]
        assert args == [f"http://127.0.0.1:{server.server_port}/health", "5", "1"]
        result = _fetch(args, check_input(check) or "")
        thread.join(10)
    finally:
        server.server_close()
    assert result.returncode == 0, result.stderr
    token = base64.b64encode(f"{HOSTILE_USER}:{HOSTILE_PASSWORD}".encode()).decode()
    assert seen["authorization"] == f"Basic {token}"
    cmdlines = seen["cmdlines"]
    assert isinstance(cmdlines, list)
    assert any("curl" in line and "-K -" in line for line in cmdlines)
    for secret in ("s:s@w", "%rd", "w%25rd", quote(HOSTILE_PASSWORD, safe="")):
        assert not [line for line in cmdlines if secret in line]


def test_a_target_without_curl_refuses_a_url_with_credentials(tmp_path):
    # No curl on PATH (sh's builtins are all fetch.sh needs to refuse).
    result = _fetch(
        ["http://127.0.0.1:1/", "3", "1"], 'user = "u:p"\n', env={"PATH": str(tmp_path)}
    )
    assert result.returncode == 3
    assert result.stdout.strip() == (
        "nixpush: the target has no curl, which a URL check with a user and password needs"
    )


def test_the_activation_refuses_credentials_without_curl_before_anything_changes():
    from operations.push.activate import _lacks_curl
    from operations.push.health import CURL_PROBE

    plain = HealthCheck(name="plain", kind="url", url="http://127.0.0.1/")
    secret = HealthCheck(name="web", kind="url", url=SECRET_URL)
    calls: list[object] = []

    class Channel:
        def __init__(self, answer):
            self.answer = answer

        def run(self, command, timeout, stdin=None):
            calls.append(command)
            return self.answer

    assert _lacks_curl(Channel((False, [])), [plain]) is None and calls == []  # type: ignore[arg-type]
    assert _lacks_curl(Channel((True, ["/usr/bin/curl"])), [plain, secret]) is None  # type: ignore[arg-type]
    assert _lacks_curl(Channel(None), [secret]) is None  # type: ignore[arg-type]
    assert calls == [CURL_PROBE, CURL_PROBE]
    assert _lacks_curl(Channel((False, [])), [plain, secret]) == (  # type: ignore[arg-type]
        "health check 'web' sends a user and password, which nixpush gives only to curl (on "
        "stdin), and the target has no curl (busybox wget takes them only in its command line, "
        "which every user and sudo's log see): add curl to the target's system, or drop the "
        "URL's user:password@"
    )


@pytest.mark.parametrize(
    ("url", "bare", "config"),
    [
        ("http://127.0.0.1/", "http://127.0.0.1/", ""),
        ("http://user@host/x", "http://host/x", 'user = "user:"\n'),
        ("http://a:b@c@host:80/p?q=@", "http://host:80/p?q=@", 'user = "a:b@c"\n'),
        ("https://u:%22%5C%0A@[::1]:8/", "https://[::1]:8/", 'user = "u:\\"\\\\\\n"\n'),
    ],
)
def test_urls_split_into_a_bare_url_and_curls_config(url, bare, config):
    from operations.push.health import curl_config, without_userinfo

    assert (without_userinfo(url), curl_config(url)) == (bare, config)
