#!/usr/bin/env bash
# Installs everything (tests/install.sh), brings the bench fleet up (a NAS and two
# emulated aarch64 Pis on this machine), then runs nixpush's main job against it:
# prepare the NAS as builder, install the secrets (push keys) from the bench's sops file, then
# build and push-deploy the Pis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
.venv/bin/python -m tests.bench up
# The bench's test-only age key, as a user's shell would have theirs.
eval "$(.venv/bin/python -m tests.bench env)"
.venv/bin/pyinfra -y tests/bench/inventory.py deploys/nas.py
.venv/bin/pyinfra -y tests/bench/inventory.py deploys/secrets.py
.venv/bin/pyinfra -y tests/bench/inventory.py deploys/pi.py
echo "The bench stays up: '.venv/bin/python -m tests.bench down' removes it."
