#!/usr/bin/env bash
# Set up .venv with the dev extras and run the test suite (CPU; GPU tests are skipped here).
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTRL_EXTRAS=dev source scripts/setup_env.sh
# A separately installed package that registers an env and a tool through entry points.
.venv/bin/python -m pip install -q --no-deps -e tests/fixtures/agentrl_plugin_example
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
