#!/usr/bin/env bash
# The GPU proof of the vllm backend on the real vLLM 0.24.0 (device kind nvidia-h200; about 6 minutes).
# Run from a checkout whose ignored folders hold, carried by earlier device calls:
#   .wv1 .. .wvN  the wheels of ../shared/gpu/vllm-0.24.0-device.txt  (pack_wheels.sh .wv -r ...; five calls)
#   .wd1 .. .wdM  the wheels of ../shared/gpu/agentrl-deps-device.txt (pack_wheels.sh .wd -r ...; two calls)
#   .wx1          the wheels of bench/vllm_server_extra_device.txt (vLLM's HTTP server; one small call)
# each already copied to /tmp/wheels on the device (`bash .wvK/unpack.sh` in its own call), and
#   models/tiny-conf  the conformance suite's tiny model, built on the CPU machine with
#                     `PYTHONPATH=. python bench/vllm_proof.py --build-models models`
# Then:  bash bench/vllm_gpu_proof.sh [all|conformance|proof]   (writes $OUT/vllm_proof.json and the server log)
# A device call runs at most 10 minutes: install the wheels in the last carrying call (`bash .wxK/unpack.sh --install`),
# then run `conformance` (about 3 minutes) and `proof` (about 3-4 minutes) in one call each, or `all` in one.
# Steps: (1) the conformance suite on vLLM in-process, float32, CUDA; (2) bench/vllm_proof.py: 3-turn
# episodes vs the trainer's recomputation (bf16, Qwen2-0.5B shape), weight updates, and the HTTP client
# against a launched `vllm serve`. Every check prints PASS/FAIL with its numbers; the exit code is 0 only if all pass.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0       # flashinfer is not carried (../shared/gpu/README.md)
export VLLM_ALLOW_LONG_MAX_MODEL_LEN=1     # the conformance suite asks 4096/8192 of a model made with 1024 positions
export TRITON_F32_DEFAULT=ieee             # float32 dots in Triton kernels in IEEE precision, not TF32 (the float32 references)
if [ -z "${AGENTRL_SITE:-}" ]; then  # not installed by bench/gpu_backends.sh: the carried folders into /tmp/site
  if [ ! -d /tmp/site/vllm ]; then
    first=$(ls -d .wv* .wd* .wx* 2>/dev/null | head -1)
    [ -n "$first" ] || { echo "no carried wheel folders (.wv*, .wd*, .wx*) here"; exit 2; }
    bash "$first/unpack.sh" --install | tail -1 || exit 2
  fi
  export PYTHONPATH=$PWD:/tmp/site
fi
OUT=${OUT:-/tmp/vllm-proof-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" || exit 2
step=${1:-all}
rc=0
t0=$SECONDS
if [ "$step" = all ] || [ "$step" = conformance ]; then
  echo "== (1) conformance suite, vllm in-process, float32 on CUDA"
  # Every failure's traceback in full (-rfE, --tb=long), nothing cut; the whole output also in $OUT/conformance.log.
  AGENTRL_TEST_DEVICE=cuda AGENTRL_TEST_MODEL_DIR=$PWD/models/tiny-conf timeout 290 python3 -m pytest -q -rfE \
    --tb=long -p no:cacheprovider -o timeout=0 tests/rollout/test_conformance.py -k "vllm and not protocol" 2>&1 \
    | tee "$OUT/conformance.log" || rc=1
  echo "conformance: $((SECONDS - t0)) s"
fi
if [ "$step" = all ] || [ "$step" = proof ]; then
  echo "== (2) 3-turn episodes, weight updates, the HTTP client against vllm serve"
  timeout 290 python3 bench/vllm_proof.py --tiny models/tiny-conf --work /tmp/vllm-proof --json "$OUT/vllm_proof.json" 2>&1 \
    | tee "$OUT/vllm_proof.log" || rc=1
  cp -r /tmp/vllm-proof/logs "$OUT/" 2>/dev/null
fi
echo "total: $((SECONDS - t0)) s, exit $rc"
exit $rc
