"""
server root: the NAS, which builds for the Pis (modules/nix/server.nix): QEMU binfmt emulation
and a higher max-jobs (deploys/nas.py applies these), and the keys it pushes with
(deploys/secrets.py installs them).
"""

# Systems built under QEMU user-mode emulation; add "armv7l-linux" for 32-bit Pis.
binfmt_emulated_systems = ["aarch64-linux"]
# nix.conf max-jobs
nix_max_jobs = 8

# Secrets the builder pushes with (see the README's "Secrets" for the entry format), decrypted
# from nixpush's own sops file (`nixpush_sops_file`, inventory.py), never from one a host nas
# pushes to could decrypt (sops-nix's). The targets' trust is derived from them: each
# target's ssh_user authorizes the deploy key's public half, and each target's Nix trusts the
# signing key's public half. No nix.conf `secret-key-files` here: the push deploy signs
# closures itself (`nix store sign -k`).
secrets = [
    {
        # OpenSSH private key (ed25519) for pushing to the Pis, as root over ssh-ng.
        "key": "ssh/nas_deploy",
        "dest": "/root/.nixpush/deploy_ed25519",
        "owner": "root",
        "group": "root",
        "mode": "0600",
    },
    {
        # Nix signing secret key (`nix key generate-secret --key-name nas-nixpush-1`).
        "key": "nix/nas_signing_key",
        "dest": "/root/.nixpush/signing-key.sec",
        "owner": "root",
        "group": "root",
        "mode": "0600",
    },
]

# Unattended runs of nixpush on the NAS (README "Unattended runs"; the README quotes this).
# Off until the owner has checked the paths below against the NAS: `enabled: True` puts
# systemd timers running nixpush-run as `user` into nas's fragment (NixOS: regenerate it and
# rebuild nas) or, on Debian, has deploys/schedule.py install them. The user needs the
# checkout, the age key and SSH access to the fleet.
schedule = {
    "enabled": False,
    "checkout": "/home/beau/nixpush",
    # Debian's units run `program`; NixOS's (the owner's) need none: they run
    # `python -m operations.run.runner` of the Nix environment written beside the fragments
    # (env/default.nix), from `checkout`.
    # "program": "/home/beau/nixpush/.venv/bin/nixpush-run",
    "user": "beau",
    "age_key_file": "/home/beau/.config/sops/age/keys.txt",
    "inventory": "inventory.py",
    "state_dir": "/var/lib/nixpush",
    "keep": 30,
    # A timer that fires during another run waits this long for the lock, then exits 75.
    "wait": 900,
    "runs": {
        # Drift check every hour: exit 2 (drift) is not a failed unit; the report says it.
        # Limited to the always-on hosts: the desktop and laptop may be asleep, and a host
        # that cannot be reached is a failure (exit 1) for nas.py and secrets.py.
        "check": {"on_calendar": "hourly", "randomized_delay": "10min", "limit": ["nas", "pi4"]},
        # Deploy the always-on targets at night: pi4. Not grill and laptop (asleep at 03:30:
        # grill, not offline_ok, would fail every run), nor nas itself (the host running the
        # deploy; switch it by hand: `pyinfra inventory.py deploys/pi.py --limit nas`).
        "deploy": {"on_calendar": "*-*-* 03:30:00", "randomized_delay": "30min", "limit": ["pi4"]},
    },
    # Metrics for node_exporter's textfile collector, and a command run after a failed or
    # drifted run (README "Alerts and metrics"); pick an ntfy topic before uncommenting.
    # "metrics_dir": "/run/nixpush-metrics",
    # "on_failure": ["/bin/sh", "-c", "curl -fsS -m 30 -H 'Title: nixpush on nas' "
    #                "--data-binary @- https://ntfy.sh/TOPIC", "sh"],
}
