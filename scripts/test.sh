#!/usr/bin/env bash
# Set up .venv with the dev extras and run the test suite (CPU; GPU tests are skipped here).
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTRL_EXTRAS=dev source scripts/setup_env.sh
# Separately installed packages that register envs and tools through entry points: the test
# fixture, and the user-written example package (its README walk-through runs as a test).
.venv/bin/python -m pip install -q --no-deps -e tests/fixtures/agentrl_plugin_example -e examples/custom_env
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
