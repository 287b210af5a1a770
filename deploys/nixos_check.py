"""
Check that every NixOS host runs what its generated fragment asks (``deploys/nixos_config.py``),
changing nothing: a host that lacks something fails, naming the options (and the fragment).

    pyinfra inventory.py deploys/nixos_check.py

The checks are the ones the other deploys make on NixOS: a builder's Nix settings and QEMU
handlers (``deploys/nas.py``), ``nix.sshServe`` for pull builds, nixpush's timers
(``deploys/schedule.py``); a target's trust of its builder's signing key and deploy key and the
deploy user's sudo (``deploys/pi.py``), its remote builder (``deploys/pull.py``). Hosts that
are not NixOS are left alone: the deploys configure them directly.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations.builder import nix, pull, timers
from operations.data.fleet import builders
from operations.data.steady import runs_nixos
from operations.nixos import checks as nixos_checks
from operations.push.start import start_deploy
from operations.trust import keys

deploy = start_deploy(state)
specs = deploy.specs
spec = specs[host.name]
wanted = spec.schedule

if not runs_nixos():
    deploy.summary.skip(host.name, "not NixOS: the deploys configure it directly")
    host.noop(f"{host.name} is not NixOS")
else:
    if host.name in builders(specs):
        served = pull.client_keys_by_user(specs, host.name)
        nixos_checks.check_nixos_builder(spec, served)
        # Every build and copy runs under sudo; a target's sudo is checked with its key below.
        user = nixos_checks.sudo_user(spec)
        if user is not None and spec.pushed_by is None:
            nixos_checks.check_nixos_sudo(name="Check the builder's sudo (NixOS)", user=user)
    nixos_checks.check_nixos_timers(
        name="Check nixpush's schedule (NixOS)",
        units=timers.unit_files(wanted) if wanted.enabled else {},
        program=wanted.program,
    )
    if spec.pushed_by is not None:  # a host that builds itself is pushed nothing
        trust = keys.builder_trust(specs, spec.pushed_by, host.name)
        nix.trusted_public_key(
            name=f"Check Nix trusts {spec.pushed_by}'s signing key (NixOS)",
            key=trust.nix_public_key,
        )
        nixos_checks.check_nixos_deploy_user(
            name="Check the deploy user's key and sudo (NixOS)",
            user=spec.ssh_user or "root",
            key=trust.ssh_public_key,
        )
        if pull.pulls(spec):
            machine = pull.build_machine_for(spec, specs[spec.pushed_by])
            pull.check_nixos_pull_client(
                name=f"Check Nix builds on {spec.pushed_by} (NixOS)", machine=machine
            )
