"""
Space before copy: a copy (and a new kernel in the boot partition) must fit on the target, or
the target fails before anything on it changes, with the numbers and the fix.

What the copy adds is the closure's paths the target lacks, each at its NAR size (what
``nix path-info`` on the builder says; unpacked, a path takes about that much). Two reads:

- on the builder, once per system (``RunCache.closures``): ``closure_command``, every path of
  the closure with its NAR size, and what the boot loader's builder copies from the toplevel:
  its ``kernel``, ``initrd`` and, when it has them, ``dtbs`` (the device trees, a directory;
  NixOS's extlinux builder copies all three): their real paths, bytes and number of files;
- on the target, one round trip: ``target_space_command``, the free space of the filesystems
  holding ``/nix/store`` and ``boot_dir`` and the latter's block size, which of the closure's
  paths it lacks (the paths go on stdin: a real closure's list is longer than one argument
  may be), and which boot files are already in ``boot_dir/nixos`` (where NixOS's extlinux
  installs them, named after their store path).

With ``substitute_on_target`` a missing path comes from the target's substituters or from the
builder, never both: it is counted once, at its NAR size, whichever way it arrives, since it
takes the same room in the store either way. Which paths the substituters have is not asked
(Nix 2.8 answers that only by querying each cache from the target, a round trip per path and
cache): it changes the bytes the builder sends, not the room the copy needs.

The store keeps ``min_free_space`` free besides (``Margin``). In the boot partition every file
is counted up to a whole block (a FAT cluster; an upper bound: the builder sends each item's
total, not each file's size), and ``BOOT_MARGIN`` stays free besides, for what the boot loader
writes next to them (its menu, written to a temporary file first). When both are one
filesystem, the needs add up (the store's margin then covers the boot loader's).

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
_BLOCK = "nixpush-boot-block"
# What the boot loader's builder copies from a toplevel, in its order (extlinux: all three).
BOOT_ITEMS = ("kernel", "initrd", "dtbs")
_BOOT_WORDS = {"dtbs": "device trees (dtbs)"}
# Kept free in boot_dir's filesystem besides the new files: the boot loader's menu and its
# temporary copy, directory entries.
BOOT_MARGIN = 1024**2
# When the target cannot say its boot filesystem's block size: ext4's and most FATs' cluster.
DEFAULT_BLOCK = 4096


@dataclass(frozen=True)
class BootFile:
    """One item the boot loader copies into ``boot_dir/nixos``: its name in the toplevel
    (``kernel``, ``initrd``, ``dtbs``), its real store path, its bytes and how many files it
    holds (a directory's, for ``dtbs``)."""

    item: str
    path: str
    size: int
    files: int = 1


@dataclass(frozen=True)
class Closure:
    """A system's closure as its builder has it: every path's NAR size, and what the boot
    loader installs (kernel, initrd, dtbs)."""

    sizes: dict[str, int]
    boot_files: tuple[BootFile, ...] = ()


@dataclass(frozen=True)
class Filesystem:
    """What ``df -Pk`` says of one filesystem, in bytes."""

    total: int
    free: int
    mount: str


@dataclass(frozen=True)
class TargetSpace:
    """What the target answered: its store's filesystem, its boot directory's (None: no such
    directory), the closure's bytes it lacks, the bytes the boot files not there yet take
    (each file up to a whole block) and which items they are."""

    store: Filesystem
    boot: Filesystem | None
    missing: int
    missing_paths: int
    boot_needed: int
    boot_items: tuple[str, ...] = ()


def closure_command(path: str) -> StringCommand:
    """On the builder: ``nix path-info`` of ``path``'s closure as JSON, then
    ``nixpush-boot-file ITEM BYTES FILES REALPATH`` for each of ``BOOT_ITEMS`` it has (a
    directory's files summed, links followed, as the boot loader's ``cp -r`` of the real path
    copies them)."""
    item_path = StringCommand(QuoteString(path), '/"$item"', _separator="")
    return StringCommand(
        # Nix prints its JSON without a newline after it.
        *NIX, "path-info", "--json", "--recursive", QuoteString(path), "&& echo &&",
        "for item in", *BOOT_ITEMS, "; do real=$(readlink -e", item_path, ") || continue;",
        "echo", _BOOT_FILE, '"$item"',
        # Two words: the item's bytes and files.
        "$(find -L \"$real\" -type f -printf '%s\\n'",
        "| awk '{ b += $1; n++ } END { print b + 0, n + 0 }')",
        '"$real"; done',
    )  # fmt: skip


def parse_closure(lines: Sequence[str]) -> Closure | None:
    """``closure_command``'s answer; None when it holds no path-info (the read failed)."""
    sizes: dict[str, int] | None = None
    boot: list[BootFile] = []
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
            fields = line.split(" ", 4)
            if len(fields) != 5 or not (fields[2].isdecimal() and fields[3].isdecimal()):
                return None
            _, item, size, files, real = fields
            boot.append(BootFile(item, real.strip(), int(size), int(files)))
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
        parts += ["echo", _BLOCK, "$(stat -f -c %S", quoted, "2>/dev/null);"]
        for boot_file in closure.boot_files:
            name = boot_name(boot_file.path)
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
    block = DEFAULT_BLOCK
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith(_DF + " ") and index + 1 < len(lines):
            filesystems[line.split()[1]] = _filesystem(lines[index + 1])
            index += 1
        elif line.startswith(_PRESENT + " "):
            present.add(line.split(" ", 1)[1])
        elif line.startswith(_BLOCK + " ") and line.split()[-1].isdecimal():
            block = int(line.split()[-1]) or DEFAULT_BLOCK
        elif line == _INVALID:
            invalid = [rest.strip() for rest in lines[index + 1 :] if rest.startswith(STORE)]
            break
        index += 1
    store = filesystems.get("store")
    if store is None or invalid is None:
        return None
    boot = filesystems.get("boot") if boot_dir is not None else None
    new = [f for f in closure.boot_files if boot_name(f.path) not in present] if boot else []
    return TargetSpace(
        store=store,
        boot=boot,
        missing=sum(closure.sizes.get(path, 0) for path in invalid),
        missing_paths=len(invalid),
        # Each file may end in a part block: count it whole (the partition's unit is a block).
        boot_needed=sum(f.size + f.files * block for f in new),
        boot_items=tuple(f.item for f in new),
    )


def _items_text(items: Sequence[str]) -> str:
    """``kernel, initrd and device trees (dtbs)``."""
    words = [_BOOT_WORDS.get(item, item) for item in items] or ["boot files"]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


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
            f" and the new {_items_text(space.boot_items)}" if shared and space.boot_needed else ""
        )
        problems.append(
            f"{target}: {store.mount} has {human(store.free)} free, {what} needs "
            f"{human(needed)} more and min_free_space keeps {human(kept)} ({margin.text}) free: "
            f"free {human(needed + kept - store.free)} on {target} (`nix-collect-garbage -d`, "
            "or set keep_generations and gc_after_deploy) or lower min_free_space"
        )
    boot_short = bool(space.boot_needed) and space.boot_needed + BOOT_MARGIN > (boot or store).free
    if boot is not None and not shared and boot_short:
        problems.append(
            f"{target}: {boot_dir} has {human(boot.free)} free, the boot loader's new "
            f"{_items_text(space.boot_items)} need {human(space.boot_needed)} and "
            f"{human(BOOT_MARGIN)} stays free besides: remove old generations (keep_generations) "
            f"and their files in {boot_dir}/nixos, or set boot_dir to where they go"
        )
    return "; ".join(problems) or None
