"""
Write each host's NixOS fragment: the Nix module that gives a NixOS host what nixpush would
otherwise write into its generated ``/etc`` (see ``operations/fragments.py``).

    pyinfra inventory.py deploys/nixos_config.py            # write nixos/<host>.nix
    pyinfra inventory.py deploys/nixos_config.py --dry      # say which would change
    pyinfra inventory.py deploys/nixos_check.py             # does each host run what it asks?

Fragments go to ``nixos_fragments_dir`` (data; default ``nixos`` under the directory pyinfra
runs in), one ``<host>.nix`` per host that builds for others, is pushed to, or runs the
schedule; the owner imports it in the host's configuration and rebuilds. Keys are derived from
sops on the controller (``SOPS_AGE_KEY_FILE``); only public halves are written.
"""

from __future__ import annotations

from pyinfra.context import host, state

from operations import fragments
from operations.fleet import builders
from operations.start import start_deploy

deploy = start_deploy(state)
specs = deploy.specs
# Only hosts with a fragment need to be up; the others (a sleeping laptop) are skipped.
fragment = fragments.host_fragment(state.inventory, specs, host.name)
deploy.summary.forgive(
    [*builders(specs), *(name for name, spec in specs.items() if spec.builder_host)]
)

if not fragment.sections:
    deploy.summary.skip(host.name, "nixpush configures nothing here: no fragment")
    host.noop(f"{host.name} needs no NixOS fragment")
else:
    path = fragments.fragment_path(fragments.fragments_dir(host.data), host.name)
    fragments.fragment_file(
        name=f"Write {host.name}'s NixOS fragment", path=str(path), text=fragment.render()
    )
    if fragment.uses_env:  # the schedule's units run nixpush from it
        fragments.fragment_file(
            name=f"Write {fragments.ENV_FILE}",
            path=str(path.with_name(fragments.ENV_FILE)),
            text=fragments.ENV_EXPRESSION,
        )
