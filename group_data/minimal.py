"""minimal root: the base every machine and image gets (boot, users, SSH)."""

# Safe switching (README "Safe switching"): what must hold after an activation before the deploy
# confirms it; otherwise the host rolls back to its previous generation. Merged across roots by
# name, like ``secrets``. Every machine must still accept SSH (the deploy's way back in) and run
# its Nix daemon (the next deploy copies through it). On NixOS sshd is sshd.service and the
# daemon is socket-activated (nix-daemon.socket). Unit checks are skipped on hosts without
# systemd.
health_checks = [
    {"name": "sshd", "units": ["sshd.service"], "timeout": 10, "retries": 2},
    {"name": "nix-daemon", "units": ["nix-daemon.socket"], "timeout": 10, "retries": 2},
]
