"""Nix system names and the QEMU user-mode emulators that run them."""

from __future__ import annotations

# Nix system -> the architecture name qemu-user-static uses for its binaries and
# binfmt handlers (qemu-<arch>-static, /usr/lib/binfmt.d/qemu-<arch>.conf).
QEMU_ARCH: dict[str, str] = {
    "x86_64-linux": "x86_64",
    "i686-linux": "i386",
    "aarch64-linux": "aarch64",
    "armv7l-linux": "arm",
    "armv6l-linux": "arm",
    "riscv64-linux": "riscv64",
    "powerpc64le-linux": "ppc64le",
    "s390x-linux": "s390x",
    "mips64el-linux": "mips64el",
    "loongarch64-linux": "loongarch64",
}

KNOWN_SYSTEMS: tuple[str, ...] = tuple(QEMU_ARCH)

# Systems a Nix of the key's system builds natively, without emulation.
NATIVE_EXTRA: dict[str, tuple[str, ...]] = {
    "x86_64-linux": ("i686-linux",),
    "aarch64-linux": (),
}


def qemu_arch(system: str) -> str:
    """The QEMU architecture for a Nix system: ``qemu_arch("armv7l-linux") == "arm"``."""
    try:
        return QEMU_ARCH[system]
    except KeyError:
        known = ", ".join(KNOWN_SYSTEMS)
        raise ValueError(f"unknown Nix system {system!r}; known systems: {known}") from None


def natively_built(system: str) -> tuple[str, ...]:
    """Systems a builder of ``system`` builds without emulation (itself included)."""
    return (system, *NATIVE_EXTRA.get(system, ()))
