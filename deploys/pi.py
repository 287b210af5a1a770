"""
Build each target's NixOS system on its builder and push-deploy it: nixpush's main job.

    pyinfra inventory.py deploys/pi.py                       # every host with a builder_host
    pyinfra inventory.py deploys/pi.py --limit pi4           # one
    pyinfra inventory.py deploys/pi.py --data deploy_action=test   # boot, dry-activate, build,
                                                                   # rollback

Per target: make sure it accepts the builder's pushes (deploy key authorized, signing key
trusted: the same operations as deploys/secrets.py, so the age key must be available); plan
(desired toplevel evaluated on the builder vs. /run/current-system); build on the builder once
per configuration; sign and copy the closure builder -> target over ssh-ng; dry-activate, then
activate safely: detached from the SSH session, health-checked, confirmed over a new SSH login,
rolled back by the target itself otherwise; activation waves (``deploy_wave``) wait for the
earlier ones; old generations pruned after a confirmed switch. A host whose ``builder_host`` is
itself (the NAS) builds on itself and copies nothing. Image hosts (``@image/NAME``) are
deploys/image.py's. The flow is ``operations.push.flow.deploy_target``.
"""

from pyinfra.context import host, state

from operations.push.flow import deploy_target
from operations.push.start import start_deploy

deploy_target(state, host, start_deploy(state))
