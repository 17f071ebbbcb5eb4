#!/usr/bin/env bash
# The quickstart: install, build the tiny model if missing, train it with GRPO on calculator-v0,
# and print held-out success before and after RL. About 10 minutes on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ ! -f models/tiny-calculator/config.json ]; then
  agentrl tiny-model --out models/tiny-calculator
fi
agentrl train examples/calculator.yaml "$@"
