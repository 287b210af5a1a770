"""Prepare the current host as a builder: QEMU binfmt for the systems it emulates, Nix settings.

A host is a builder when its data lists ``binfmt_emulated_systems`` or another host names it
as ``builder_host``. A builder's ``remote_builders`` (its pool) get their machines lines here,
and each pool member its restricted account with the builder's key. Run with ``pyinfra
inventory.py deploys/nas.py``.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations.builder import binfmt, nix, pool, pull
from operations.data.fleet import builders
from operations.data.steady import runs_nixos
from operations.nixos import checks as nixos_checks
from operations.push.start import start_deploy

specs = start_deploy(state).specs
spec = specs[host.name]
systems = list(spec.binfmt_emulated_systems)
is_builder = host.name in builders(specs)
is_member = pool.is_pool_member(specs, host.name)

# Pull builds: targets with builder_user run their builds here over ssh-ng (deploys/pull.py
# configures their side); a pool member serves its builders the same way. Their client keys
# come from sops, decrypted now (prepare time).
served = pool.served_keys(specs, host.name)
# The builder's side of its pool, checked now: a bad member value stops the run here.
machines = pool.pool_file(specs, host.name) if is_builder else None

if not is_builder and not is_member:
    host.noop(f"{host.name} builds for nobody")
elif runs_nixos():
    # Only checks on NixOS (/etc is generated): the host's fragment holds the options.
    nixos_checks.check_nixos_builder(spec, served)
    for machine in machines.machines if machines else ():
        pull.check_nixos_pull_client(
            name=f"Check Nix builds on {machine.alias} (NixOS)", machine=machine
        )
else:
    if is_builder or systems:
        # QEMU first: a host it cannot be set up on (no apt-get, a foreign /etc/binfmt.d file)
        # fails before nix.conf changes, so nothing is half-applied. A pool member that
        # emulates nothing leaves the machine's handlers alone.
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
    if machines is not None:
        for machine in machines.machines:
            pull.builder_ssh_alias(
                name=f"Point ssh alias {machine.alias} at {machine.hostname}", machine=machine
            )
        pool.pool_machines_file(name=f"List the build pool in {nix.MACHINES_FILE}", pool=machines)
        if machines.machines:
            nix.remote_builders(name=f"Let Nix use {nix.MACHINES_FILE}")
