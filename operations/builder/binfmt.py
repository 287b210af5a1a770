"""QEMU user-mode emulation through the kernel's binfmt_misc, so a builder runs foreign binaries.

A handler ``qemu-<arch>`` is registered from Debian's ``/usr/lib/binfmt.d/qemu-<arch>.conf``
(package qemu-user-static) with the fix-binary flag ``F``: the kernel opens the interpreter once,
at registration, so it also works inside Nix's build sandbox and other mount namespaces.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from io import StringIO
from typing import Any

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Which
from pyinfra.operations import apt, files
from typing_extensions import override

from operations.core.failures import fail_host, require_root
from operations.core.files import LinesFact
from operations.core.nixos_advice import nix_list, nixos_options_error
from operations.core.systems import KNOWN_SYSTEMS, natively_built, qemu_arch
from operations.data.steady import runs_nixos

BINFMT_MISC = "/proc/sys/fs/binfmt_misc"
REGISTER = f"{BINFMT_MISC}/register"
PACKAGE_BINFMT_DIR = "/usr/lib/binfmt.d"
LOCAL_BINFMT_DIR = "/etc/binfmt.d"
MANAGED_MARKER = "# managed by nixpush"
QEMU_PACKAGE = "qemu-user-static"
FIX_BINARY = "F"


def handler_name(system: str) -> str:
    """The binfmt handler name for a Nix system: ``handler_name("armv7l-linux") == "qemu-arm"``."""
    return f"qemu-{qemu_arch(system)}"


def package_conf_path(name: str) -> str:
    """Debian's binfmt.d file for a handler, e.g. /usr/lib/binfmt.d/qemu-aarch64.conf."""
    return f"{PACKAGE_BINFMT_DIR}/{name}.conf"


def local_conf_path(name: str) -> str:
    """The /etc/binfmt.d file nixpush writes for a handler; it overrides the package's one."""
    return f"{LOCAL_BINFMT_DIR}/{name}.conf"


def sandbox_path(system: str) -> str:
    """The ``extra-sandbox-paths`` entry exposing a system's Debian QEMU interpreter.

    Debian's interpreter is a relative symlink to /usr/bin/qemu-<arch>-static, so the binary
    itself is mounted at the interpreter's path (``target=source``).
    """
    arch = qemu_arch(system)
    return f"/usr/libexec/qemu-binfmt/{arch}-binfmt-P=/usr/bin/qemu-{arch}-static"


def validate_systems(systems: Sequence[str], native_system: str | None = None) -> list[str]:
    """Check ``systems`` are known, not native and unique; return their handler names."""
    names: list[str] = []
    native = natively_built(native_system) if native_system else ()
    for system in systems:
        if system not in KNOWN_SYSTEMS:
            raise OperationError(
                f"{host.name}: unknown Nix system {system!r} in binfmt_emulated_systems; "
                f"known systems: {', '.join(KNOWN_SYSTEMS)}",
            )
        if system in native:
            raise OperationError(
                f"{host.name}: {system} is built natively by a {native_system} host; "
                "remove it from binfmt_emulated_systems",
            )
        name = handler_name(system)
        if name not in names:
            names.append(name)
    return names


# Facts


@dataclass(frozen=True)
class BinfmtHandler:
    """One entry of /proc/sys/fs/binfmt_misc, as the kernel reports it."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int = 0
    magic: str | None = None  # lower-case hex, for magic (M) handlers
    mask: str | None = None  # lower-case hex
    extension: str | None = None  # for extension (E) handlers


class BinfmtHandlers(FactBase[dict[str, BinfmtHandler] | None]):
    """The kernel's binfmt_misc handlers by name; ``None`` when binfmt_misc is not mounted.

    .. code:: python

        {"qemu-aarch64": BinfmtHandler(name="qemu-aarch64", enabled=True, flags="POF", ...)}
    """

    @override
    def command(self) -> str:
        # Nothing is printed when binfmt_misc is not mounted: that is an answer (None), and the
        # `|| true` keeps an entry vanishing between the glob and `cat` from failing the host.
        return (
            f"if [ -e {BINFMT_MISC}/status ]; then "
            f"echo status $(cat {BINFMT_MISC}/status); "
            f"for f in {BINFMT_MISC}/*; do "
            'case "${f##*/}" in register|status) ;; *) echo "== ${f##*/}"; cat "$f";; esac; '
            "done; fi || true"
        )

    @override
    def process(self, output: list[str]) -> dict[str, BinfmtHandler]:
        handlers: dict[str, BinfmtHandler] = {}
        name: str | None = None
        fields: dict[str, str] = {}
        for line in [*output, "== "]:
            if line.startswith("== "):
                if name:
                    handlers[name] = _handler_from_fields(name, fields)
                name, fields = line[3:].strip(), {}
            elif name is not None:
                if line in ("enabled", "disabled"):
                    fields["state"] = line
                else:
                    key, _, value = line.partition(" ")
                    fields[key.rstrip(":")] = value.strip()
        return handlers


def _handler_from_fields(name: str, fields: dict[str, str]) -> BinfmtHandler:
    extension = fields.get("extension")
    return BinfmtHandler(
        name=name,
        enabled=fields.get("state") == "enabled",
        interpreter=fields.get("interpreter", ""),
        flags=fields.get("flags", ""),
        offset=int(fields.get("offset", "0")),
        magic=fields.get("magic"),
        mask=fields.get("mask"),
        extension=extension.removeprefix(".") if extension else None,
    )


class ManagedBinfmtConfs(LinesFact):
    """Handler names whose /etc/binfmt.d/qemu-*.conf starts with nixpush's marker line."""

    @override
    def command(self) -> StringCommand:
        return StringCommand(
            f"for f in {LOCAL_BINFMT_DIR}/qemu-*.conf; do",
            '[ -f "$f" ] && [ "$(head -n 1 "$f")" =',
            QuoteString(MANAGED_MARKER),
            '] && echo "${f##*/}";',
            "done || true",
        )

    @override
    def process(self, output: list[str]) -> list[str]:
        return sorted(line.removesuffix(".conf") for line in output if line.endswith(".conf"))


class MissingPaths(LinesFact):
    """Which of ``paths`` do not exist (symlinks followed)."""

    @override
    def command(self, paths: Sequence[str]) -> StringCommand:
        parts: list[Any] = ["for p in"]
        parts.extend(QuoteString(path) for path in paths)
        parts.append('; do [ -e "$p" ] || echo "$p"; done')
        return StringCommand(*parts)


# The register format: `:name:type:offset:magic:mask:interpreter:flags`.


@dataclass(frozen=True)
class BinfmtRegistration:
    """One line of a binfmt.d file, as written to /proc/sys/fs/binfmt_misc/register."""

    name: str
    kind: str  # "M" magic or "E" extension
    offset: str
    magic: str  # as written, with \\xHH escapes
    mask: str
    interpreter: str
    flags: str

    @classmethod
    def parse(cls, line: str) -> BinfmtRegistration:
        """Parse a register line; ValueError if it is not one."""
        if len(line) < 2:
            raise ValueError(f"not a binfmt_misc register line: {line!r}")
        sep = line[0]
        parts = line[1:].split(sep)
        if len(parts) != 7 or parts[1] not in ("M", "E") or not parts[0] or not parts[5]:
            raise ValueError(f"not a binfmt_misc register line: {line!r}")
        return cls(*parts)

    @classmethod
    def from_conf(cls, lines: Sequence[str]) -> BinfmtRegistration:
        """The registration in a binfmt.d file's lines (comments skipped)."""
        entries = [line for line in lines if line.strip() and line[0] not in "#;"]
        if len(entries) != 1:
            raise ValueError(f"expected one binfmt_misc entry, found {len(entries)}")
        return cls.parse(entries[0].strip())

    def with_flag(self, flag: str) -> BinfmtRegistration:
        """The same registration with ``flag`` set."""
        return self if flag in self.flags else replace(self, flags=self.flags + flag)

    def line(self) -> str:
        """The register line: ``:qemu-aarch64:M::\\x7f...:...:/usr/libexec/...:OPF``."""
        fields = (self.name, self.kind, self.offset, self.magic, self.mask)
        return ":" + ":".join((*fields, self.interpreter, self.flags))

    def matches(self, handler: BinfmtHandler) -> bool:
        """Whether the kernel's ``handler`` is this registration (enabled or not)."""
        if handler.interpreter != self.interpreter or set(handler.flags) != set(self.flags):
            return False
        if self.kind == "E":
            return handler.extension == self.magic
        return (
            handler.offset == int(self.offset or "0")
            and handler.magic == _unescape_hex(self.magic)
            and handler.mask == (_unescape_hex(self.mask) if self.mask else None)
        )


def _unescape_hex(value: str) -> str:
    """Hex of the bytes a register field stands for (the kernel decodes only ``\\xHH``)."""
    data = bytearray()
    for escaped, literal in re.findall(r"\\x([0-9a-fA-F]{2})|(.)", value, flags=re.DOTALL):
        data.extend(bytes.fromhex(escaped) if escaped else literal.encode("latin-1"))
    return data.hex()


# Command builders


def mount_binfmt_misc() -> StringCommand:
    return StringCommand("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_MISC)


def register_handler(registration: BinfmtRegistration) -> StringCommand:
    # printf '%s', not echo: the line's \x escapes must reach the kernel, which decodes them.
    return StringCommand("printf", "'%s\\n'", QuoteString(registration.line()), ">", REGISTER)


def unregister_handler(name: str) -> StringCommand:
    return StringCommand("echo", "-1", ">", QuoteString(f"{BINFMT_MISC}/{name}"))


def enable_handler(name: str) -> StringCommand:
    return StringCommand("echo", "1", ">", QuoteString(f"{BINFMT_MISC}/{name}"))


def remove_file(path: str) -> StringCommand:
    return StringCommand("rm", "-f", QuoteString(path))


def local_conf_text(registration: BinfmtRegistration) -> str:
    return f"{MANAGED_MARKER}\n{registration.line()}\n"


# Operation


@operation()
def emulated_systems(
    systems: list[str],
    native_system: str | None = None,
) -> Generator[PyinfraCommand, None, None]:
    """
    Let the kernel run binaries of ``systems`` with QEMU, now and after a reboot.

    + systems: Nix systems to emulate, e.g. ``["aarch64-linux", "armv7l-linux"]``
    + native_system: the host's own Nix system; its natively built systems are refused

    Per system, the handler ``qemu-<arch>`` is registered from Debian's
    ``/usr/lib/binfmt.d/qemu-<arch>.conf`` with the fix-binary flag ``F`` (installing
    qemu-user-static with apt when missing, mounting binfmt_misc when unmounted) and persisted in
    ``/etc/binfmt.d/qemu-<arch>.conf``, marked ``# managed by nixpush``. A handler registered
    with other flags or another interpreter is unregistered first. A ``/etc/binfmt.d`` file
    without the marker that registers anything else fails the host before any change.
    Handlers of systems no longer listed are unregistered and their file removed only when that
    file carries the marker: handlers nixpush did not create are left alone. On NixOS nothing
    is written: the host fails with the ``boot.binfmt.emulatedSystems`` value to set unless its
    handlers already run.

    **Example:**

    .. code:: python

        binfmt.emulated_systems(systems=["aarch64-linux"], native_system="x86_64-linux")
    """
    names = validate_systems(systems, native_system)

    if runs_nixos():
        yield from _check_nixos(systems)
        return

    require_root("registering binfmt handlers needs root")
    changed = False
    for command in _emulation_commands(names):
        changed = True
        yield command

    if not changed:
        if names:
            host.noop(
                f"binfmt handlers {', '.join(names)} are enabled with flag F "
                f"and persisted in {LOCAL_BINFMT_DIR}",
            )
        else:
            host.noop("no systems to emulate and no binfmt handlers managed by nixpush")


def _emulation_commands(names: Sequence[str]) -> Generator[PyinfraCommand, None, None]:
    """What makes the handlers ``names`` registered and persisted, in order: the interpreters
    installed, a foreign ``/etc/binfmt.d`` file refused, binfmt_misc mounted, each handler
    registered and its file written, handlers nixpush no longer manages removed."""
    registrations = yield from _installed_registrations(names)
    if registrations is None:
        return
    # A /etc/binfmt.d file someone else wrote fails the host before anything is registered.
    local_confs = {
        name: host.get_fact(FileContents, path=local_conf_path(name)) for name in registrations
    }
    for name, registration in registrations.items():
        current = local_confs[name]
        if _is_foreign(current) and not _registers(current, registration):
            yield fail_host(
                f"{host.name}: {local_conf_path(name)} was not written by nixpush (no "
                f"{MANAGED_MARKER!r} first line) and differs from {registration.line()}; "
                "remove it or make it that line"
            )
            return

    handlers = host.get_fact(BinfmtHandlers)
    if handlers is None:
        yield mount_binfmt_misc()
        handlers = host.get_fact(BinfmtHandlers) or {}

    for name, registration in registrations.items():
        yield from _handler_registered(registration, handlers.get(name), local_confs[name])

    for name in host.get_fact(ManagedBinfmtConfs):
        if name in registrations:
            continue
        if name in handlers:
            yield unregister_handler(name)
        yield remove_file(local_conf_path(name))


def _installed_registrations(
    names: Sequence[str],
) -> Generator[PyinfraCommand, None, dict[str, BinfmtRegistration] | None]:
    """The wanted registration per handler, installing Debian's package first when a handler
    file or interpreter is missing; None once the host has failed."""
    registrations = _package_registrations(names)
    interpreters = [r.interpreter for r in (registrations or {}).values()]
    if registrations is not None and not (
        interpreters and host.get_fact(MissingPaths, paths=interpreters)
    ):
        return registrations
    if not host.get_fact(Which, command="apt-get"):
        yield fail_host(
            f"{host.name}: no apt-get to install {QEMU_PACKAGE}; install QEMU user-mode "
            f"emulators and the binfmt.d files {', '.join(names)} by hand"
        )
        return None
    yield from apt.packages._inner(packages=[QEMU_PACKAGE], update=True)
    # At execute time this runs after the install, so the files are read again.
    registrations = _package_registrations(names)
    if registrations is None:
        yield fail_host(
            f"{host.name}: {QEMU_PACKAGE} is installed but has no "
            f"{', '.join(package_conf_path(name) for name in names)}; reinstall it"
        )
    return registrations


def _handler_registered(
    registration: BinfmtRegistration,
    handler: BinfmtHandler | None,
    current: list[str] | None,
) -> Generator[PyinfraCommand, None, None]:
    """One handler registered as wanted (re-registered when its flags or interpreter differ,
    enabled when disabled) and persisted in its ``/etc/binfmt.d`` file."""
    name = registration.name
    if handler is None:
        yield register_handler(registration)
    elif not registration.matches(handler):
        yield unregister_handler(name)
        yield register_handler(registration)
    elif not handler.enabled:
        yield enable_handler(name)
    wanted = local_conf_text(registration)
    # A file written by hand with the very same registration is left as it is.
    if not _is_foreign(current) and current != wanted.splitlines():
        yield from files.put._inner(src=StringIO(wanted), dest=local_conf_path(name), mode="644")


def _is_foreign(lines: list[str] | None) -> bool:
    return lines is not None and lines[:1] != [MANAGED_MARKER]


def _registers(lines: list[str] | None, registration: BinfmtRegistration) -> bool:
    """Whether binfmt.d file ``lines`` register exactly ``registration`` (comments aside)."""
    try:
        return BinfmtRegistration.from_conf(lines or []) == registration
    except ValueError:
        return False


def _package_registrations(names: Sequence[str]) -> dict[str, BinfmtRegistration] | None:
    """The wanted registration per handler, from the package's files; None if one is missing."""
    registrations: dict[str, BinfmtRegistration] = {}
    for name in names:
        lines = host.get_fact(FileContents, path=package_conf_path(name))
        if lines is None:
            return None
        try:
            registration = BinfmtRegistration.from_conf(lines)
        except ValueError as e:
            raise OperationError(f"{host.name}: {package_conf_path(name)}: {e}") from None
        if registration.name != name:
            raise OperationError(
                f"{host.name}: {package_conf_path(name)} registers {registration.name!r}, "
                f"not {name!r}",
            )
        registrations[name] = registration.with_flag(FIX_BINARY)
    return registrations


def _check_nixos(systems: Sequence[str]) -> Generator[PyinfraCommand, None, None]:
    # NixOS names its handlers after the system (boot.binfmt.registrations.<system>).
    handlers = host.get_fact(BinfmtHandlers) or {}
    missing = [
        system
        for system in systems
        if not any(
            (h := handlers.get(name)) is not None and h.enabled
            for name in (system, handler_name(system))
        )
    ]
    if missing:
        option = f"boot.binfmt.emulatedSystems = {nix_list(systems)};"
        yield fail_host(nixos_options_error(host.name, [option]))
    else:
        host.noop(f"{host.name} runs NixOS and already emulates {', '.join(systems)}")
