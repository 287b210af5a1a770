"""
What a system boots with, and whether a new one needs a reboot to be fully in effect.

A ``switch`` makes the new userspace current, but the kernel, initrd, kernel modules and
kernel parameters stay the booted system's until the next boot. NixOS's auto-upgrade decides
to reboot by comparing exactly these (``readlink`` of ``kernel``, ``initrd`` and
``kernel-modules`` under ``/run/booted-system`` and the new system); nixpush compares them the
same way, plus the contents of ``kernel-params``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

BOOTED_SYSTEM = "/run/booted-system"
# The files of a NixOS toplevel that only a reboot brings into effect, in the order reported.
BOOT_FILES = ("kernel", "initrd", "kernel-modules", "kernel-params")
# Prefix of the lines that say them (``boot_files_command`` in operations/push/reboot.py).
BOOT_LINE = "nixpush-boot "


@dataclass(frozen=True)
class BootFiles:
    """
    A system's boot files: where ``kernel``, ``initrd`` and ``kernel-modules`` resolve to, and
    what ``kernel-params`` says ("" for a missing one).
    """

    kernel: str = ""
    initrd: str = ""
    kernel_modules: str = ""
    kernel_params: str = ""

    @classmethod
    def parse(cls, values: dict[str, str]) -> BootFiles:
        """From ``{"kernel": ..., "kernel-params": ...}`` (missing files read as "")."""
        return cls(*(values.get(name, "") for name in BOOT_FILES))

    def changes_to(self, new: BootFiles) -> tuple[str, ...]:
        """What differs, one text each, in ``BOOT_FILES`` order: ``("kernel A → B",)``; empty:
        no reboot needed."""
        return tuple(
            f"{name} {getattr(self, f.name) or 'none'} → {getattr(new, f.name) or 'none'}"
            for name, f in zip(BOOT_FILES, fields(self), strict=True)
            if getattr(self, f.name) != getattr(new, f.name)
        )


def parse_boot_lines(lines: list[str]) -> dict[str, BootFiles]:
    """``nixpush-boot SYSTEM FILE VALUE`` lines -> system path -> its ``BootFiles``; a system
    whose path does not exist there is left out."""
    values: dict[str, dict[str, str]] = {}
    for line in lines:
        if not line.startswith(BOOT_LINE):
            continue
        system, _, rest = line[len(BOOT_LINE) :].partition(" ")
        name, _, value = rest.partition(" ")
        if name == "absent":
            continue
        values.setdefault(system, {})[name] = value.strip()
    return {system: BootFiles.parse(files) for system, files in values.items()}


def describe(changes: tuple[str, ...]) -> str:
    """``reboot needed: kernel A → B, initrd C → D``."""
    return "reboot needed: " + ", ".join(changes)
