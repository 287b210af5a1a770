"""
The owner's fleet. ``_FLEET`` is the one table to edit: each host's roots and data. The root
groups below are derived from it, so a host's roots are written once. Names starting with ``_``
are not pyinfra groups.

Root data lives in ``group_data/<root>.py``; the keys are described in the README's data contract.
"""

from operations.trust.hostkeys import pin_host_keys

# The owner's flake checkout, as the builder (nas) resolves it: git+file builds what is
# committed there and each report names its revision (path: would take the working tree,
# uncommitted edits included, with no revision).
_FLAKE = "git+file:///home/beau/nixos-config"
# The sops-encrypted secrets file, as the controller (where pyinfra runs) finds it.
_SOPS_FILE = "/home/beau/nixos-config/secrets.yaml"
# nixpush's own keys (nas's push and signing keys, group_data/server.py) in a sops file of
# their own, encrypted only to the owner's age key: secrets.yaml is encrypted to the hosts' keys
# too (sops-nix), and sops encrypts a whole file with one data key, so pi4 could decrypt the
# key that opens every host nas pushes to. nixpush refuses a file a pushed host can decrypt.
_NIXPUSH_SOPS_FILE = "/home/beau/nixos-config/nixpush/secrets.yaml"

# Data every host gets. Kept here rather than in group_data/all.py, which would also apply to
# every other inventory run from this directory (the bench fleet's, for one).
_FLEET_WIDE = {
    "flake": _FLAKE,
    "sops_file": _SOPS_FILE,
    "nixpush_sops_file": _NIXPUSH_SOPS_FILE,
    # pyinfra defaults to accept-new and ignores ssh_config's StrictHostKeyChecking.
    "ssh_strict_host_key_checking": "yes",
    # Where deploys/nixos_config.py writes each host's NixOS fragment: inside the flake, so
    # hosts/<host>/default.nix can import ../../nixpush/<host>.nix (git add them).
    "nixos_fragments_dir": "/home/beau/nixos-config/nixpush",
    # Activation waves (deploy_wave, per host below; 0 when unset): pi4 first, the desktops
    # next, the NAS last. A deployed host of a wave waits this long before its health checks
    # run again and the next wave starts.
    "wave_soak": 60,
}

# Host name -> roots and data. The owner edits addresses here.
_FLEET = {
    # desktop
    # desktop: built natively on nas (x86_64, no emulation) and pushed like the Pi
    "grill": {
        "roots": ["minimal", "common", "network", "main", "work", "gaming"],
        "data": {
            "nix_system": "x86_64-linux",
            "ssh_hostname": "grill.lan",
            "ssh_user": "beau",
            "_sudo": True,
            "deploy_wave": 1,
            "builder_host": "nas",
            # Fill in from `ssh-keyscan -t ed25519 grill.lan`, checked against grill's
            # /etc/ssh/ssh_host_ed25519_key.pub out of band (nas verifies it before pushing):
            # "ssh_host_key": "ssh-ed25519 AAAA...",
        },
    },
    # laptop: like grill, but often asleep or away: unreachable is `offline`, not a failure
    "laptop": {
        "roots": ["minimal", "common", "network", "main", "work"],
        "data": {
            "nix_system": "x86_64-linux",
            "ssh_hostname": "laptop.lan",
            "ssh_user": "beau",
            "_sudo": True,
            "builder_host": "nas",
            "offline_ok": True,
            "deploy_wave": 1,
            # From `ssh-keyscan -t ed25519 laptop.lan`, checked out of band:
            # "ssh_host_key": "ssh-ed25519 AAAA...",
        },
    },
    # server: the builder (QEMU binfmt and max-jobs come from group_data/server.py). It builds
    # and deploys itself too (builder_host is itself): nothing is copied, the switch is as safe
    # as a Pi's. Last: it builds every other host, so it changes only once they are fine.
    "nas": {
        "roots": ["minimal", "common", "network", "main", "server"],
        "data": {
            "nix_system": "x86_64-linux",
            "ssh_hostname": "nas.lan",
            "ssh_user": "beau",
            "_sudo": True,
            "builder_host": "nas",
            "deploy_wave": 2,
        },
    },
    # Raspberry Pi 4: built on nas, pushed over SSH; wave 0 (the default): activated first
    "pi4": {
        "roots": ["minimal", "common", "network"],
        "data": {
            "nix_system": "aarch64-linux",
            "ssh_hostname": "192.168.1.122",
            "ssh_port": 8023,
            "ssh_user": "beau",
            "_sudo": True,
            "builder_host": "nas",
            # Pull builds (deploys/pull.py), off until you want them: pi4 would build on nas
            # as nix-ssh with the key `ssh/pi4_builder` from secrets.yaml. To turn them on,
            # add that key to secrets.yaml and uncomment these two lines (README "Pull builds"):
            # "builder_user": "nix-ssh",
            # "secrets": [{"key": "ssh/pi4_builder", "dest": "/root/.ssh/nixpush_builder"}],
            # The builder verifies pi4's host key before pushing (never accept-new). Fill in the
            # key's type and base64 from `ssh-keyscan -p 8023 -t ed25519 192.168.1.122`,
            # checked against the Pi's /etc/ssh/ssh_host_ed25519_key.pub out of band:
            # "ssh_host_key": "ssh-ed25519 AAAA...",
        },
    },
}

# Built but never connected to: image hosts (`@image/NAME`, operations/builder/connector.py), which
# deploys/image.py builds on their builder and nothing else acts on. "roots" is what the flake
# gives the configuration; roots' group data (secrets, health checks) is for running machines,
# so images are in the `images` group instead.
_IMAGES = {
    "iso": {
        "roots": ["minimal"],
        "data": {
            "nix_system": "x86_64-linux",
            "builder_host": "nas",
            "image_attr": "isoImage",
            # Where the controller keeps the .iso (a directory: the image's own file name):
            # "image_dest": "/home/beau/images/",
        },
    },
}


def _members(root):
    # A host with ssh_host_key is pinned to it: the controller's own connection checks that key
    # (operations/trust/hostkeys.py), never trusting whoever answers first.
    return pin_host_keys(
        [
            (name, {**_FLEET_WIDE, **host["data"]})
            for name, host in _FLEET.items()
            if root in host["roots"]
        ]
    )


minimal = _members("minimal")
common = _members("common")
network = _members("network")
main = _members("main")
work = _members("work")
gaming = _members("gaming")
server = _members("server")
images = [(f"@image/{name}", {**_FLEET_WIDE, **image["data"]}) for name, image in _IMAGES.items()]
