"""
network root: tailnet machines (Tailscale, joined to the owner's headscale) and the desktop
bits that come with them (Kitty).
"""

# Secrets to install from the sops file (``sops_file``): the sops key path, where the decrypted
# value goes on the host, and its owner, group and mode (default root, root, "0600").
# pyinfra would let one root's ``secrets`` replace another's; deploys/secrets.py merges the
# ``secrets`` of every root a host is in (operations.secrets.host_secrets).
secrets = [
    {
        # The Tailscale pre-auth key, as modules/services/tailscale/network.nix reads it.
        "key": "headscale/pre_auth",
        "dest": "/run/secrets/headscale-pre-auth",
        "owner": "root",
        "group": "root",
        "mode": "0600",
    },
]

# Safe switching: a tailnet machine whose tailscaled does not come up after a switch is cut
# off from the owner's other machines (and from a remote fix), so it rolls back. Only the unit:
# whether the tailnet is reachable at 03:30 says nothing about the new configuration.
# 8 s at worst: with minimal's checks, 24 s of the default 30 s confirm_timeout.
health_checks = [
    {"name": "tailscaled", "units": ["tailscaled.service"], "timeout": 3, "retries": 1},
]
