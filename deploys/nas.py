"""Prepare the current host as a builder: QEMU binfmt for the systems it emulates, Nix settings.

A host is a builder when its data lists ``binfmt_emulated_systems`` or another host names it
as ``builder_host``. Run with ``pyinfra inventory.py deploys/nas.py``.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations.builder import binfmt, nix, pull
from operations.data.fleet import builders
from operations.data.steady import runs_nixos
from operations.nixos import checks as nixos_checks
from operations.push.start import start_deploy

specs = start_deploy(state).specs
spec = specs[host.name]
systems = list(spec.binfmt_emulated_systems)

# Pull builds: targets with builder_user run their builds here over ssh-ng (deploys/pull.py
# configures their side). Their client keys come from sops, decrypted now (prepare time).
served = pull.client_keys_by_user(specs, host.name)

if host.name not in builders(specs):
    host.noop(f"{host.name} builds for nobody")
elif runs_nixos():
    # Only checks on NixOS (/etc is generated): the host's fragment holds the options.
    nixos_checks.check_nixos_builder(spec, served)
else:
    # QEMU first: a host it cannot be set up on (no apt-get, a foreign /etc/binfmt.d file)
    # fails before nix.conf changes, so nothing is half-applied.
    binfmt.emulated_systems(
        name="Register QEMU binfmt handlers",
        systems=systems,
        native_system=spec.nix_system,
    )
    nix.nix_settings(
        name="Let Nix build for the emulated systems",
        systems=systems,
        max_jobs=spec.nix_max_jobs,
    )
    for user, keys in served.items():
        pull.builder_account(name=f"Create the remote-build user {user}", user=user)
        pull.builder_authorized_keys(
            name=f"Let the pulling targets' keys run nix-daemon as {user}", user=user, keys=keys
        )
        nix.trusted_user(name=f"Trust {user} in Nix", user=user)
