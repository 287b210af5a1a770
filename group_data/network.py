"""
network root: tailnet machines (Tailscale, joined to the owner's headscale) and the desktop
bits that come with them (Kitty).
"""

# No `secrets` here: on the owner's hosts sops-nix installs the Tailscale pre-auth key
# (sops.secrets."headscale/pre_auth", which modules/services/tailscale/network.nix reads) at
# every activation, and a second copy from nixpush would only go stale beside it. A host
# without sops-nix can still get it from nixpush through its `secrets` data (README "Secrets
# (sops)"), e.g. {"key": "headscale/pre_auth", "dest": "/run/secrets/headscale-pre-auth"}.

# Safe switching: a tailnet machine whose tailscaled does not come up after a switch is cut
# off from the owner's other machines (and from a remote fix), so it rolls back. Only the unit:
# whether the tailnet is reachable at 03:30 says nothing about the new configuration.
# 8 s at worst: with minimal's checks, 24 s of the default 30 s confirm_timeout.
health_checks = [
    {"name": "tailscaled", "units": ["tailscaled.service"], "timeout": 3, "retries": 1},
]
