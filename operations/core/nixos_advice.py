"""
Hosts that run NixOS: ``/etc`` is generated from the host's configuration there, so nixpush
writes nothing into it. Operations check what the running system has instead, and fail the
host naming the options to set (``nixos_options_error``).
"""

from __future__ import annotations

from collections.abc import Sequence

from operations.core.nixexpr import nix_value

# Where NixOS puts each user's users.users.<name>.openssh.authorizedKeys (sshd reads it there).
NIXOS_AUTHORIZED_KEYS_DIR = "/etc/ssh/authorized_keys.d"


def nix_list(values: Sequence[str]) -> str:
    """A Nix list literal of strings: ``nix_list(["a"]) == '[ "a" ]'``."""
    return nix_value(list(values))


def nixos_options_error(host_name: str, options: Sequence[str]) -> str:
    """The failure for a NixOS host missing ``options`` (each ``"option = value;"``)."""
    wanted = " and ".join(options)
    return (
        f"{host_name} runs NixOS: set {wanted} in its configuration, then rebuild it "
        f"(`pyinfra @local deploys/nixos_config.py` writes them to {host_name}'s "
        "generated fragment, which its configuration imports)"
    )
