"""minimal root: the base every machine and image gets (boot, users, SSH)."""

# Safe switching (README "Safe switching"): what must hold after an activation before the deploy
# confirms it; otherwise the host rolls back to its previous generation. Merged across roots by
# name, like ``secrets``. Every machine must still accept SSH (the deploy's way back in) and run
# its Nix daemon (the next deploy copies through it). On NixOS sshd is sshd.service and the
# daemon is socket-activated (nix-daemon.socket). Unit checks are skipped on hosts without
# systemd. Every check of a host must fit in its confirm_timeout at worst ((retries + 1) x
# timeout + retries x 2 s): a unit's state is an instant answer, 8 s each at worst.
health_checks = [
    {"name": "sshd", "units": ["sshd.service"], "timeout": 3, "retries": 1},
    {"name": "nix-daemon", "units": ["nix-daemon.socket"], "timeout": 3, "retries": 1},
]
