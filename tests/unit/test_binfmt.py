from __future__ import annotations

import pytest
from pyinfra.api import OperationError
from pyinfra.api.command import FileUploadCommand, FunctionCommand
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, FileContents
from pyinfra.facts.server import User, Which

from operations.builder import binfmt
from operations.builder.binfmt import (
    BinfmtHandler,
    BinfmtHandlers,
    BinfmtRegistration,
    ManagedBinfmtConfs,
    MissingPaths,
    emulated_systems,
)
from operations.core.runstate import summary_for
from tests.unit.fake_host import FakeHost, FakeState, failure, nix_host, run, shell

# /usr/lib/binfmt.d/qemu-aarch64.conf and qemu-arm.conf from Debian 12's qemu-user-static.
AARCH64_LINE = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00"
    r"\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    r":/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF"
)
ARM_LINE = (
    r":qemu-arm:M::\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00"
    r"\x28\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    r":/usr/libexec/qemu-binfmt/arm-binfmt-P:OPF"
)
AARCH64_INTERPRETER = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"

# The kernel prints "flags: " with a trailing space when a handler has no flags.
NO_FLAGS = "flags: "
# What the fact command prints: the kernel's entry format (fs/binfmt_misc.c, entry_status).
PROC_OUTPUT = f"""\
status enabled
== python3.11
enabled
interpreter /usr/bin/python3.11
{NO_FLAGS}
offset 0
magic a70d0d0a
== qemu-aarch64
enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
== qemu-arm
disabled
interpreter /usr/libexec/qemu-binfmt/arm-binfmt-P
flags: PO
offset 0
magic 7f454c4601010100000000000000000002002800
mask ffffffffffffff00fffffffffffffffffeffffff
== cli
enabled
interpreter /usr/lib/mono/exe
{NO_FLAGS}
extension .exe
""".splitlines()

AARCH64 = BinfmtHandler(
    name="qemu-aarch64",
    enabled=True,
    interpreter=AARCH64_INTERPRETER,
    flags="POF",
    offset=0,
    magic="7f454c460201010000000000000000000200b700",
    mask="ffffffffffffff00fffffffffffffffffeffffff",
)

FRAGMENT_HINT = (
    "(`pyinfra @local deploys/nixos_config.py` writes them to nas's generated fragment, "
    "which its configuration imports)"
)


# Pure: the facts' process() and command text


def test_handlers_parsed_from_kernel_output():
    handlers = BinfmtHandlers().process(PROC_OUTPUT)
    assert sorted(handlers) == ["cli", "python3.11", "qemu-aarch64", "qemu-arm"]
    assert handlers["qemu-aarch64"] == AARCH64
    assert handlers["qemu-arm"].enabled is False
    assert handlers["qemu-arm"].flags == "PO"
    assert handlers["python3.11"].flags == ""
    assert handlers["python3.11"].mask is None
    assert handlers["cli"].extension == "exe"
    assert handlers["cli"].magic is None


def test_handlers_mounted_without_entries_is_empty_not_missing():
    assert BinfmtHandlers().process(["status enabled"]) == {}
    # No output at all (binfmt_misc not mounted) is pyinfra's default: None.
    assert BinfmtHandlers().default() is None


def test_handlers_command_tolerates_missing_mount():
    command = BinfmtHandlers().command()
    assert command.startswith("if [ -e /proc/sys/fs/binfmt_misc/status ]")
    assert command.endswith("|| true")


def test_managed_confs_process_and_quoted_marker():
    fact = ManagedBinfmtConfs()
    assert fact.process(["qemu-arm.conf", "qemu-aarch64.conf"]) == ["qemu-aarch64", "qemu-arm"]
    assert fact.default() == []
    assert "'# managed by nixpush'" in fact.command().get_raw_value()


def test_missing_paths_quotes_hostile_path():
    command = MissingPaths().command(paths=["/a b", "/x; whoami"]).get_raw_value()
    assert command == ("for p in '/a b' '/x; whoami' ; do [ -e \"$p\" ] || echo \"$p\"; done")


def test_registration_round_trip_and_match():
    registration = BinfmtRegistration.parse(AARCH64_LINE)
    assert registration.name == "qemu-aarch64"
    assert registration.interpreter == AARCH64_INTERPRETER
    assert registration.flags == "OPF"
    assert registration.line() == AARCH64_LINE
    assert registration.matches(AARCH64)  # "OPF" written, "POF" reported: same flags


def test_registration_mismatches():
    registration = BinfmtRegistration.parse(AARCH64_LINE)
    assert not registration.matches(BinfmtHandler(**{**AARCH64.__dict__, "flags": "PO"}))
    assert not registration.matches(
        BinfmtHandler(**{**AARCH64.__dict__, "interpreter": "/usr/bin/qemu-aarch64"})
    )
    assert not registration.matches(BinfmtHandler(**{**AARCH64.__dict__, "magic": "7f454c46"}))


def test_registration_from_conf_skips_comments_and_adds_f():
    registration = BinfmtRegistration.from_conf(["# managed by nixpush", AARCH64_LINE])
    assert registration.name == "qemu-aarch64"
    no_f = BinfmtRegistration.parse(AARCH64_LINE.removesuffix("OPF") + "OP")
    assert no_f.with_flag("F").flags == "OPF"
    with pytest.raises(ValueError, match="not a binfmt_misc register line"):
        BinfmtRegistration.parse(":qemu-aarch64:M::")


def test_register_command_quotes_line():
    registration = BinfmtRegistration.parse(AARCH64_LINE)
    assert binfmt.register_handler(registration).get_raw_value() == (
        f"printf '%s\\n' '{AARCH64_LINE}' > /proc/sys/fs/binfmt_misc/register"
    )
    hostile = BinfmtRegistration.parse(":x'; whoami #:M::\\x7f::/bin/sh:F")
    assert binfmt.register_handler(hostile).get_raw_value() == (
        "printf '%s\\n' ':x'\"'\"'; whoami #:M::\\x7f::/bin/sh:F' > "
        "/proc/sys/fs/binfmt_misc/register"
    )


def test_unregister_command_quotes_name():
    assert binfmt.unregister_handler("qemu-arm").get_raw_value() == (
        "echo -1 > /proc/sys/fs/binfmt_misc/qemu-arm"
    )
    assert binfmt.unregister_handler("x; whoami").get_raw_value() == (
        "echo -1 > '/proc/sys/fs/binfmt_misc/x; whoami'"
    )


def test_handler_names_and_sandbox_paths():
    assert binfmt.handler_name("armv7l-linux") == "qemu-arm"
    assert binfmt.sandbox_path("aarch64-linux") == (
        "/usr/libexec/qemu-binfmt/aarch64-binfmt-P=/usr/bin/qemu-aarch64-static"
    )


# Operation: emulated_systems with faked facts


def debian_builder(**overrides) -> FakeHost:
    """An x86_64 Debian NAS that already emulates aarch64 the way nixpush wants."""
    host = FakeHost("nas")
    host.fact(File, None, path="/etc/NIXOS")
    host.fact(User, "root")
    host.fact(FileContents, [AARCH64_LINE], path="/usr/lib/binfmt.d/qemu-aarch64.conf")
    host.fact(FileContents, [ARM_LINE], path="/usr/lib/binfmt.d/qemu-arm.conf")
    host.fact(MissingPaths, [], paths=[AARCH64_INTERPRETER])
    host.fact(BinfmtHandlers, BinfmtHandlers().process(PROC_OUTPUT))
    host.fact(
        FileContents,
        ["# managed by nixpush", AARCH64_LINE],
        path="/etc/binfmt.d/qemu-aarch64.conf",
    )
    host.fact(ManagedBinfmtConfs, ["qemu-aarch64"])
    for cls, value, kwargs in overrides.get("facts", []):
        host.fact(cls, value, **kwargs)
    return host


def test_already_right_is_a_noop():
    host = debian_builder()
    assert run(host, emulated_systems, ["aarch64-linux"]) == []
    assert host.noops == [
        "binfmt handlers qemu-aarch64 are enabled with flag F and persisted in /etc/binfmt.d"
    ]


def test_fresh_host_registers_and_persists():
    host = debian_builder(
        facts=[
            (BinfmtHandlers, {}, {}),
            (FileContents, None, {"path": "/etc/binfmt.d/qemu-aarch64.conf"}),
            (ManagedBinfmtConfs, [], {}),
            (File, None, {"path": "/etc/binfmt.d/qemu-aarch64.conf"}),
            (Directory, None, {"path": "/etc/binfmt.d/qemu-aarch64.conf"}),
            (Directory, {"mode": 755}, {"path": "/etc/binfmt.d"}),
        ]
    )
    commands = run(host, emulated_systems, ["aarch64-linux"])
    assert shell(commands) == [
        f"printf '%s\\n' '{AARCH64_LINE}' > /proc/sys/fs/binfmt_misc/register",
        "FileUploadCommand:/etc/binfmt.d/qemu-aarch64.conf",
        "chmod 644 /etc/binfmt.d/qemu-aarch64.conf",
    ]
    upload = commands[1]
    assert isinstance(upload, FileUploadCommand)
    assert upload.src.getvalue() == f"# managed by nixpush\n{AARCH64_LINE}\n"
    assert host.noops == []


def test_unmounted_binfmt_misc_is_mounted_first():
    host = debian_builder(facts=[(BinfmtHandlers, None, {})])
    commands = shell(run(host, emulated_systems, ["aarch64-linux"]))
    assert commands[:2] == [
        "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
        f"printf '%s\\n' '{AARCH64_LINE}' > /proc/sys/fs/binfmt_misc/register",
    ]


def test_handler_without_f_is_reregistered():
    handlers = BinfmtHandlers().process(PROC_OUTPUT)
    handlers["qemu-aarch64"] = BinfmtHandler(**{**AARCH64.__dict__, "flags": "PO"})
    host = debian_builder(facts=[(BinfmtHandlers, handlers, {})])
    assert shell(run(host, emulated_systems, ["aarch64-linux"])) == [
        "echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64",
        f"printf '%s\\n' '{AARCH64_LINE}' > /proc/sys/fs/binfmt_misc/register",
    ]


def test_disabled_right_handler_is_enabled():
    handlers = BinfmtHandlers().process(PROC_OUTPUT)
    handlers["qemu-aarch64"] = BinfmtHandler(**{**AARCH64.__dict__, "enabled": False})
    host = debian_builder(facts=[(BinfmtHandlers, handlers, {})])
    assert shell(run(host, emulated_systems, ["aarch64-linux"])) == [
        "echo 1 > /proc/sys/fs/binfmt_misc/qemu-aarch64",
    ]


def test_stale_managed_handler_removed_foreign_left_alone():
    # qemu-arm is registered and its /etc file is nixpush's; python3.11 and cli are not ours.
    host = debian_builder(facts=[(ManagedBinfmtConfs, ["qemu-aarch64", "qemu-arm"], {})])
    assert shell(run(host, emulated_systems, ["aarch64-linux"])) == [
        "echo -1 > /proc/sys/fs/binfmt_misc/qemu-arm",
        "rm -f /etc/binfmt.d/qemu-arm.conf",
    ]


def test_no_systems_and_nothing_managed():
    host = debian_builder(facts=[(ManagedBinfmtConfs, [], {})])
    assert run(host, emulated_systems, []) == []
    assert host.noops == ["no systems to emulate and no binfmt handlers managed by nixpush"]


def test_missing_package_installed_with_apt():
    host = debian_builder(
        facts=[
            (FileContents, None, {"path": "/usr/lib/binfmt.d/qemu-aarch64.conf"}),
            (Which, "/usr/bin/apt-get", {"command": "apt-get"}),
            (DebPackages, {}, {}),
        ]
    )
    commands = shell(run(host, emulated_systems, ["aarch64-linux"]))
    assert commands[0] == "apt-get update"
    assert commands[1] == (
        "DEBIAN_FRONTEND=noninteractive apt-get -y "
        '-o Dpkg::Options::="--force-confdef" -o Dpkg::Options::="--force-confold" '
        "install qemu-user-static"
    )
    # Here the fake still has no package file after the install: the host fails, clearly.
    assert commands[2] == (
        "_log_and_fail: nas: qemu-user-static is installed but has no "
        "/usr/lib/binfmt.d/qemu-aarch64.conf; reinstall it"
    )


def test_unknown_package_manager_fails_that_host():
    host = debian_builder(
        facts=[
            (FileContents, None, {"path": "/usr/lib/binfmt.d/qemu-aarch64.conf"}),
            (Which, None, {"command": "apt-get"}),
        ]
    )
    commands = run(host, emulated_systems, ["aarch64-linux"])
    assert len(commands) == 1 and isinstance(commands[0], FunctionCommand)
    assert str(commands[0].args[0]) == (
        "nas: no apt-get to install qemu-user-static; install QEMU user-mode emulators "
        "and the binfmt.d files qemu-aarch64 by hand"
    )


def test_foreign_local_conf_fails_that_host_before_anything_is_registered():
    host = debian_builder(
        facts=[
            (FileContents, ["# mine", ARM_LINE], {"path": "/etc/binfmt.d/qemu-aarch64.conf"}),
            (BinfmtHandlers, {}, {}),
        ]
    )
    (command,) = shell(run(host, emulated_systems, ["aarch64-linux"]))
    assert command.startswith(
        "_log_and_fail: nas: /etc/binfmt.d/qemu-aarch64.conf was not written by nixpush"
    )


def test_identical_local_conf_written_by_hand_is_left_alone():
    host = debian_builder(
        facts=[(FileContents, [AARCH64_LINE], {"path": "/etc/binfmt.d/qemu-aarch64.conf"})]
    )
    assert run(host, emulated_systems, ["aarch64-linux"]) == []
    assert host.noops == [
        "binfmt handlers qemu-aarch64 are enabled with flag F and persisted in /etc/binfmt.d"
    ]


def test_hostile_or_unknown_system_rejected():
    host = debian_builder()
    with pytest.raises(OperationError) as error:
        run(host, emulated_systems, ["aarch64-linux; whoami"])
    assert "unknown Nix system 'aarch64-linux; whoami'" in str(error.value)
    assert "known systems: x86_64-linux, i686-linux, aarch64-linux" in str(error.value)


def test_native_system_rejected():
    with pytest.raises(OperationError, match="x86_64-linux is built natively"):
        run(debian_builder(), emulated_systems, ["x86_64-linux"], native_system="x86_64-linux")


def test_non_root_without_sudo_rejected():
    host = debian_builder(facts=[(User, "beau", {})])
    with pytest.raises(OperationError) as error:
        run(host, emulated_systems, ["aarch64-linux"])
    assert str(error.value) == (
        "nas: connected as 'beau', not root, and registering binfmt handlers needs root; "
        "set _sudo=True in its host or group data"
    )


def nixos_builder(handlers: dict[str, BinfmtHandler]) -> FakeHost:
    return nix_host("nas", None, nixos=True).fact(BinfmtHandlers, handlers)


def test_nixos_with_handlers_is_a_noop():
    handler = BinfmtHandler(**{**AARCH64.__dict__, "name": "aarch64-linux", "flags": "P"})
    host = nixos_builder({"aarch64-linux": handler})
    assert run(host, emulated_systems, ["aarch64-linux"]) == []
    assert host.noops == ["nas runs NixOS and already emulates aarch64-linux"]


def test_nixos_without_handlers_fails_with_the_option():
    host = nixos_builder({})
    assert failure(host, emulated_systems, ["aarch64-linux", "armv7l-linux"]) == (
        'nas runs NixOS: set boot.binfmt.emulatedSystems = [ "aarch64-linux" "armv7l-linux" ]; '
        "in its configuration, then rebuild it"
        f" {FRAGMENT_HINT}"
    )


def test_fail_host_command_fails_only_that_host():
    # pyinfra treats a FunctionCommand returning False as that host's failure.
    host = nixos_builder({})
    (command,) = run(host, emulated_systems, ["aarch64-linux"])
    logged: list[str] = []

    class Host:
        name = "nas"

        def log_styled(self, message, **kwargs):
            logged.append(message)

    state = FakeState()
    assert command.execute(state, Host(), {}) is False
    assert logged[0].startswith("failed: nas runs NixOS")
    # ... and the cause reaches the run's summary (and nixpush-run's report).
    assert summary_for(state).causes["nas"].startswith("nas runs NixOS")
