"""
Space before copy: a copy (and a new kernel in the boot partition) must fit on the target, or
the target fails before anything on it changes, with the numbers and the fix.

What the copy adds is the closure's paths the target lacks, each at its NAR size (what
``nix path-info`` on the builder says; unpacked, a path takes about that much). Two reads:

- on the builder, once per system (``RunCache.closures``): ``closure_command``, every path of
  the closure with its NAR size, and the toplevel's ``kernel`` and ``initrd`` (their real
  paths and sizes);
- on the target, one round trip: ``target_space_command``, the free space of the filesystems
  holding ``/nix/store`` and ``boot_dir``, which of the closure's paths it lacks (the paths
  go on stdin: a real closure's list is longer than one argument may be), and whether the
  kernel and initrd are already in ``boot_dir/nixos`` (where NixOS's extlinux installs them,
  named after their store path).

The store keeps ``min_free_space`` free besides (``Margin``); the boot partition needs only
the files' sizes. When both are one filesystem, the needs add up.

.. code:: python

    closure = parse_closure(lines_from_builder)
    report = parse_target_space(lines_from_target, closure, boot_dir="/boot")
    problem = shortfall("pi4", report, Margin.parse("1G"))   # None: it fits
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pyinfra.api.command import QuoteString, StringCommand

from operations.builder.nix_commands import NIX
from operations.core.models import Margin

STORE = "/nix/store"
# Where each part of the answers starts.
_BOOT_FILE = "nixpush-boot-file"
_DF = "nixpush-df"
_PRESENT = "nixpush-boot-present"
_INVALID = "nixpush-invalid"


@dataclass(frozen=True)
class Closure:
    """A system's closure as its builder has it: every path's NAR size, and the files the boot
    loader installs (kernel, initrd): their real store paths and sizes."""

    sizes: dict[str, int]
    boot_files: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Filesystem:
    """What ``df -Pk`` says of one filesystem, in bytes."""

    total: int
    free: int
    mount: str


@dataclass(frozen=True)
class TargetSpace:
    """What the target answered: its store's filesystem, its boot directory's (None: no such
    directory), the closure's bytes it lacks, and the bytes of the boot files not there yet."""

    store: Filesystem
    boot: Filesystem | None
    missing: int
    missing_paths: int
    boot_needed: int


def closure_command(path: str) -> StringCommand:
    """On the builder: ``nix path-info`` of ``path``'s closure as JSON, then
    ``nixpush-boot-file SIZE REALPATH`` for its kernel and initrd (when it has them)."""
    quoted = (QuoteString(f"{path}/kernel"), QuoteString(f"{path}/initrd"))
    return StringCommand(
        # Nix prints its JSON without a newline after it.
        *NIX, "path-info", "--json", "--recursive", QuoteString(path), "&& echo && { readlink -e",
        *quoted, "|| true; } | xargs -r stat -L -c", QuoteString(f"{_BOOT_FILE} %s %n"),
    )  # fmt: skip


def parse_closure(lines: Sequence[str]) -> Closure | None:
    """``closure_command``'s answer; None when it holds no path-info (the read failed)."""
    sizes: dict[str, int] | None = None
    boot: list[tuple[str, int]] = []
    for line in lines:
        if line.startswith("["):
            try:
                infos = json.loads(line)
            except json.JSONDecodeError:
                return None
            sizes = {
                info["path"]: int(info.get("narSize", 0))
                for info in infos
                if isinstance(info, dict) and "path" in info
            }
        elif line.startswith(_BOOT_FILE + " "):
            _, size, real = line.split(" ", 2)
            boot.append((real.strip(), int(size)))
    return None if sizes is None else Closure(sizes, tuple(boot))


def boot_name(real_path: str) -> str:
    """The name NixOS's extlinux gives a boot file in ``boot_dir/nixos``: its store path
    without ``/nix/store/``, slashes as dashes (``HASH-linux-6.1-Image``)."""
    return real_path.removeprefix(STORE + "/").replace("/", "-")


def target_space_command(closure: Closure, boot_dir: str | None) -> StringCommand:
    """On the target, the closure's paths on stdin: ``df -Pk`` of the store (and of
    ``boot_dir`` when it is a directory), which boot files are in ``boot_dir/nixos``, and the
    paths it lacks."""
    parts: list[str | QuoteString | StringCommand] = [
        "echo", _DF, "store; df -Pk", QuoteString(STORE), "| tail -n 1;",
    ]  # fmt: skip
    if boot_dir is not None and closure.boot_files:
        quoted = QuoteString(boot_dir)
        parts += ["if [ -d", quoted, "]; then echo", _DF, "boot; df -Pk", quoted, "| tail -n 1;"]
        for real, _ in closure.boot_files:
            name = boot_name(real)
            parts += ["[ -e", QuoteString(f"{boot_dir}/nixos/{name}"), "] && echo", _PRESENT]
            parts += [QuoteString(name), ";"]
        parts += ["fi;"]
    parts += ["echo", _INVALID, "; xargs -r nix-store --check-validity --print-invalid"]
    return StringCommand(*parts)


def _filesystem(line: str) -> Filesystem | None:
    # df -P: Filesystem 1024-blocks Used Available Capacity Mounted-on (which may hold spaces)
    fields = line.split(None, 5)
    if len(fields) < 6 or not (fields[1].isdecimal() and fields[3].isdecimal()):
        return None
    return Filesystem(int(fields[1]) * 1024, int(fields[3]) * 1024, fields[5].strip())


def parse_target_space(
    lines: Sequence[str], closure: Closure, boot_dir: str | None
) -> TargetSpace | None:
    """``target_space_command``'s answer; None when it is incomplete (the read failed)."""
    filesystems: dict[str, Filesystem | None] = {}
    present: set[str] = set()
    invalid: list[str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith(_DF + " ") and index + 1 < len(lines):
            filesystems[line.split()[1]] = _filesystem(lines[index + 1])
            index += 1
        elif line.startswith(_PRESENT + " "):
            present.add(line.split(" ", 1)[1])
        elif line == _INVALID:
            invalid = [rest.strip() for rest in lines[index + 1 :] if rest.startswith(STORE)]
            break
        index += 1
    store = filesystems.get("store")
    if store is None or invalid is None:
        return None
    boot = filesystems.get("boot") if boot_dir is not None else None
    boot_needed = sum(size for real, size in closure.boot_files if boot_name(real) not in present)
    return TargetSpace(
        store=store,
        boot=boot,
        missing=sum(closure.sizes.get(path, 0) for path in invalid),
        missing_paths=len(invalid),
        boot_needed=boot_needed if boot is not None else 0,
    )


def human(size: int) -> str:
    """``human(1536 * 1024**2) == "1.5 GiB"``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1024:.1f} KiB"


def shortfall(target: str, space: TargetSpace, margin: Margin, boot_dir: str | None) -> str | None:
    """Why the copy does not fit on ``target`` (the numbers and the fix), or None."""
    store, boot = space.store, space.boot
    shared = boot is not None and boot.mount == store.mount
    # Boot files on the store's filesystem take from the same free space.
    boot_needed = space.boot_needed if shared else 0
    needed = space.missing + boot_needed
    kept = margin.of(store.total)
    problems = []
    if needed and needed + kept > store.free:
        what = "the copy" + (
            " and the new kernel and initrd" if shared and space.boot_needed else ""
        )
        problems.append(
            f"{target}: {store.mount} has {human(store.free)} free, {what} needs "
            f"{human(needed)} more and min_free_space keeps {human(kept)} ({margin.text}) free: "
            f"free {human(needed + kept - store.free)} on {target} (`nix-collect-garbage -d`, "
            "or set keep_generations and gc_after_deploy) or lower min_free_space"
        )
    if boot is not None and not shared and space.boot_needed > boot.free:
        problems.append(
            f"{target}: {boot_dir} has {human(boot.free)} free, the new kernel and initrd need "
            f"{human(space.boot_needed)}: remove old generations (keep_generations) and their "
            f"kernels in {boot_dir}/nixos, or set boot_dir to where they go"
        )
    return "; ".join(problems) or None
