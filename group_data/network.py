"""
network root: tailnet machines (Tailscale, joined to the owner's headscale) and the desktop
bits that come with them (Kitty).
"""

# Secrets to install from the sops file (``sops_file``): the sops key path, where the decrypted
# value goes on the host, and its owner, group and mode. Note: pyinfra replaces, not merges, a
# key set by two groups, so a host in several roots gets only one root's ``secrets``.
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
