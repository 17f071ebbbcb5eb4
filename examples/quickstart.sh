#!/usr/bin/env bash
# The quickstart: install, build the tiny model if missing, train it with GRPO on calculator-v0,
# print held-out success before and after RL, and write the run's report (runs/calculator/report.html).
# About 10 minutes on two CPU cores.
# Running it again replaces the previous quickstart run in runs/calculator (--overwrite); pass
# --resume to continue that run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ ! -f models/tiny-calculator/config.json ]; then
  agentrl tiny-model --out models/tiny-calculator
fi
case " $* " in
  *" --resume "*) ;;
  *) set -- --overwrite "$@" ;;
esac
agentrl train examples/calculator.yaml "$@"
agentrl report runs/calculator
