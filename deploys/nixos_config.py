"""
Write every host's NixOS fragment on the controller: the Nix module that gives a NixOS host
what nixpush would otherwise write into its generated ``/etc`` (``operations/nixos/fragments.py``),
and ``env/default.nix`` beside them (nixpush's Python environment, the checkout's ``default.nix``:
what the schedule's NixOS units run nixpush with), always, so a controller can use it too.

    pyinfra @local deploys/nixos_config.py            # write nixos/<host>.nix for inventory.py
    pyinfra @local deploys/nixos_config.py --dry      # say which would change
    pyinfra @local deploys/nixos_config.py --data nixpush_inventory=other_inventory.py

It runs on the controller (``@local``) and reaches no host of the fleet: a fragment is needed
before a host can be deployed, often before its first boot, and a sleeping laptop needs one as
much as an awake NAS. The fleet is read from ``inventory.py`` in the directory pyinfra runs in
(``nixpush_inventory`` to name another), with its ``group_data/``, and checked as every deploy
checks it.

Fragments go to ``nixos_fragments_dir`` (data; default ``nixos`` under the directory pyinfra
runs in), one ``<host>.nix`` per host that builds for others, is pushed to, or runs the
schedule; the owner imports it in the host's configuration and rebuilds. Keys are derived from
sops on the controller (``SOPS_AGE_KEY_FILE``); only public halves are written.
"""

from __future__ import annotations

from pyinfra import logger
from pyinfra.context import host, state

from operations.data.fleet import FleetError, check_fleet, inventory_file
from operations.nixos import fragments

if host.name != "@local" or len(state.inventory) != 1:
    raise FleetError(
        [
            "deploys/nixos_config.py writes files on the controller and reaches no host: run "
            "`pyinfra @local deploys/nixos_config.py` (it reads inventory.py; add --data "
            "nixpush_inventory=FILE for another inventory)"
        ]
    )

fleet = fragments.fleet_inventory(inventory_file(host))
specs = check_fleet(fleet)
written = fragments.fleet_fragments(specs)
if len(written.without) == len(specs):
    host.noop("nixpush configures nothing on any host: no fragment")
for name in written.without:
    logger.info(f"    {name}: nixpush configures nothing here: no fragment")
for path, (label, text) in written.files.items():
    fragments.fragment_file(name=label, path=str(path), text=text)
