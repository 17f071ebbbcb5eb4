#!/usr/bin/env bash
# The GPU run behind docs/benchmarks.md's end-to-end training numbers (device kind nvidia-h200-x2), from a
# checkout whose ignored folders hold: .wd1 (wheels of agentrl-deps-device.txt without ray, packed with
# ../shared/gpu/pack_wheels.sh), models/tiny-calculator (the quickstart's tokenizer) and, for the
# baseline variant, .baseline (`git archive <commit> agentrl environments` of the code measured against).
#   bash bench/e2e_gpu.sh [bench/e2e.py train options, e.g. --only NAME,NAME]
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ ! -d /tmp/site/agentrl ]; then
  bash .wd1/unpack.sh --install > /dev/null
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
base=(); [ -d .baseline ] && base=(--baseline-src .baseline)
timeout "${E2E_TIMEOUT:-540}" python3 bench/e2e.py --workload train --tokenizer models/tiny-calculator \
  --work-dir /tmp/e2e --steps "${E2E_STEPS:-6}" --json "$OUT/train.json" "${base[@]}" "$@"
rc=$?
mkdir -p "$OUT/logs"; cp /tmp/e2e/runs/*.log "$OUT/logs/" 2>/dev/null
for d in /tmp/e2e/runs/*/; do [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/logs/$(basename "$d").metrics.jsonl"; done
exit $rc
