#!/usr/bin/env bash
# Installs everything (tests/install.sh), then runs the linters and the whole test suite:
# unit and operation tests, and end-to-end tests against the bench fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -v "$@"
