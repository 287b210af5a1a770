#!/usr/bin/env bash
# Installs everything (tests/install.sh), then runs the linters and the whole test suite:
# unit and operation tests, and end-to-end tests against the bench fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Deploy files are scripts (no package): checked apart, or deploys/secrets.py would shadow
# the standard library's secrets module for the rest.
.venv/bin/mypy deploys/*.py
# The layers of operations/ (pyproject.toml's import-linter contract): no import points up.
.venv/bin/lint-imports
# The activation program, as POSIX sh.
shellcheck -s sh operations/push/*.sh
# The ten slowest tests (setup and teardown apart), to keep CI time in view.
exec .venv/bin/pytest -v --durations=10 "$@"
