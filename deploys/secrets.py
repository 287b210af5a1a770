"""Install every host's secrets from sops, and the SSH and Nix trust the push deploy needs.

Run with ``SOPS_AGE_KEY_FILE=~/.config/sops/age/keys.txt pyinfra inventory.py deploys/secrets.py``.

- every host: its ``secrets`` (merged from all its roots, see ``fleet.host_secrets``), decrypted on
  the controller and written through stdin;
- a target pushed by another host (its ``builder_host``, not itself): its ``ssh_user``
  authorizes the builder's deploy key and its Nix trusts the builder's signing key (both public
  halves derived in memory);
- a builder: the public halves sit next to its deploy and signing keys (``ssh -i`` refuses a
  key whose ``.pub`` differs), and ``/root/.nixpush/known_hosts`` holds each of its targets'
  ``ssh_host_key``, for the targets in the run (``--limit``): a target left out needs none yet.

Everything is decrypted and checked here, at prepare time, so a missing key, a wrong age key or
a missing owner stops the run before any host changes. ``--dry`` lists the secret files that
would change, never their content.
"""

from __future__ import annotations

from io import StringIO

from pyinfra.context import host, inventory, state
from pyinfra.operations import files

from operations.builder import nix
from operations.data.fleet import FleetError
from operations.push.start import start_deploy
from operations.trust import keys, secrets, ssh

specs = start_deploy(state).specs
spec = specs[host.name]
# An image host is never connected to: nothing is installed on it.
planned = [] if spec.is_image else secrets.plan_secrets(host, specs)

trust = None
if spec.pushed_by is not None:  # a host that builds itself pushes to nobody but itself
    trust = keys.builder_trust(specs, spec.pushed_by, host.name)

# Targets of this run only (`--limit nas --limit pi4`): a target left out (a desktop not set up
# yet) needs no host key until a run includes it.
targets = [
    other
    for other in specs.values()
    if other.pushed_by == host.name and state.is_host_in_limit(inventory.get_host(other.name))
]
unknown = [t for t in targets if t.ssh_host_key is None or t.ssh_hostname is None]
if unknown:
    raise FleetError(
        [
            f"{t.name}: ssh_host_key is missing, so {host.name} can't verify it when pushing; "
            f"set it to the host's public key (`ssh-keyscan -p {t.ssh_port or 22} -t ed25519 "
            f"{t.ssh_hostname or 'HOST'}`, checked out of band)"
            for t in unknown
        ]
    )
pushes = any(other.pushed_by == host.name for other in specs.values())
own = keys.builder_trust(specs, host.name, host.name) if pushes else None
# Pull builds: a target's builder-client key is one of its `secrets` (installed below like any
# other); deploys/nas.py authorizes it on the builder, deploys/pull.py configures Nix to use it.

for item in planned:
    secrets.secret_file(
        name=f"Install secret {item.secret.label} at {item.secret.dest}",
        dest=item.secret.dest,
        content=item.value,
        owner=item.secret.owner,
        group=item.secret.group,
        mode=item.secret.mode,
    )

if trust is not None:
    ssh.authorized_key(
        name=f"Authorize {spec.pushed_by}'s deploy key for the deploy user",
        user=spec.ssh_user or "root",
        key=trust.ssh_public_key,
    )
    nix.trusted_public_key(
        name=f"Trust store paths signed by {spec.pushed_by}",
        key=trust.nix_public_key,
    )

if own is not None:
    for path, public in (
        (keys.DEPLOY_KEY_PATH, own.ssh_public_key),
        (keys.SIGNING_KEY_PATH.removesuffix(".sec"), own.nix_public_key),
    ):
        files.put(
            name=f"Write {path}.pub",
            src=StringIO(f"{public}\n"),
            dest=f"{path}.pub",
            user="root",
            group="root",
            mode="644",
        )

for target in targets:
    assert target.ssh_hostname is not None and target.ssh_host_key is not None
    # Every address the target may be reached by (ssh_hostname a list): the builder pushes to
    # whichever answered this run, with the same pinned key.
    for address in target.ssh_addresses or (target.ssh_hostname,):
        ssh.known_host(
            name=f"Know {target.name}'s host key at {address}",
            host_pattern=ssh.known_hosts_name(address, target.ssh_port),
            key=target.ssh_host_key,
        )
