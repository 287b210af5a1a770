"""Pull builds, target side: a Pi with ``builder_user`` builds on its builder through Nix.

Run after ``deploys/nas.py`` (which authorizes the Pi's key on the builder) and
``deploys/secrets.py`` (which installs the Pi's builder-client key from sops, like every other
secret): ``pyinfra inventory.py deploys/pull.py``. For each such target it writes the ssh
alias of its builder, the builder's line in ``/etc/nix/machines`` (with the builder's host key
from its ``ssh_host_key``) and ``builders = @/etc/nix/machines``; on NixOS it checks them and
names the options instead. Other hosts log ``does not pull builds``.

Its own deploy rather than part of ``deploys/secrets.py``: pull builds are optional, and
secrets.py stays about keys and trust; the one secret involved is ordinary ``secrets`` data.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations.builder import nix, pull
from operations.data.steady import runs_nixos
from operations.push.start import start_deploy
from operations.trust import keys

specs = start_deploy(state).specs
spec = specs[host.name]

if spec.builder_host is None or not pull.pulls(spec):
    host.noop(f"{host.name} does not pull builds (no builder_host and builder_user)")
else:
    machine = pull.build_machine_for(spec, specs[spec.builder_host])
    # Fails here, before any host changes, when the key is not declared or can't be read.
    keys.pull_client_key(specs, host.name, host.name)
    if runs_nixos():
        pull.check_nixos_pull_client(
            name=f"Check Nix builds on {spec.builder_host} (NixOS)", machine=machine
        )
    else:
        pull.builder_ssh_alias(name=f"Let root's ssh reach {machine.alias}", machine=machine)
        pull.build_machine(name=f"List {spec.builder_host} in {nix.MACHINES_FILE}", machine=machine)
        nix.remote_builders(name=f"Let Nix use {nix.MACHINES_FILE}")
