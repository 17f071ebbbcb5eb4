#!/usr/bin/env bash
# Set up .venv with the dev extras and run the test suite (CPU; GPU tests are skipped here).
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTRL_EXTRAS=dev source scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
