#!/usr/bin/env bash
# The GPU proof of the SGLang and vLLM backends (docs/backends.md, docs/benchmarks.md), run on the device in
# back-to-back calls from a checkout whose ignored folders hold the wheels packed with ../shared/gpu/pack_wheels.sh:
#   .wv1 ... .wv5   vllm-0.24.0-device.txt      .ws1 ... .ws9   sglang-0.5.17-device.txt
#   .wd1            agentrl-deps-device.txt without ray (gymnasium, jsonschema, pydantic, ...)
# The two engines pin different versions of shared packages (xgrammar, apache-tvm-ffi, openai; SGLang also needs
# transformers 5.12.1), so each gets its own install folder: /tmp/site_vllm and /tmp/site_sglang, with agentrl
# and its own dependencies in /tmp/site_common on both paths.
#
#   bash bench/gpu_backends.sh carry vllm .wv1          copy one folder's wheels (parts) aside, nothing else
#   bash bench/gpu_backends.sh install vllm             reassemble and install vllm (and agentrl into site_common)
#   bash bench/gpu_backends.sh env vllm                 print the exports that put an engine on PYTHONPATH
#   bash bench/gpu_backends.sh background NAME CMD...   run CMD detached (setsid), output in /tmp/bg/NAME.log
#   bash bench/gpu_backends.sh wait NAME SECONDS         wait for a background job to end (at most SECONDS)
#   bash bench/gpu_backends.sh bench ENGINE [ARGS...]    bench/rollout.py: HF generate, the built-in engine and ENGINE
#                                                        (in-process) on the random Qwen2-0.5B shape; rows in /tmp/bg
#   bash bench/gpu_backends.sh bench3 [ARGS...]         one bench/rollout.py run: HF, built-in, SGLang and vLLM (each
#                                                        engine in a child process with its install folder)
#   bash bench/gpu_backends.sh long [ARGS...]           bench/rollout_long.py: the built-in engine and SGLang at 4k-32k
#   bash bench/gpu_backends.sh frontend                  bench/vllm_frontend.py: vLLM's own front ends on workload (a)
#   bash bench/gpu_backends.sh table                     one table of every bench run's rows (backend columns)
#   bash bench/gpu_backends.sh collect                  copy /tmp/bg/* into $OUT, print statuses and log tails
set -uo pipefail
what=$1; shift
case "$what" in
  carry)
    engine=$1 folder=$2
    mkdir -p "/tmp/wheels_$engine"
    find "$folder" -maxdepth 1 \( -name '*.whl' -o -name '*.part-*' \) -exec cp {} "/tmp/wheels_$engine/" \;
    echo "$engine: $(ls "/tmp/wheels_$engine" | wc -l) files, $(du -sh "/tmp/wheels_$engine" | cut -f1)"
    ;;
  install)
    engine=$1
    cd "/tmp/wheels_$engine" || exit 1
    for first in *.part-000; do
      [ -e "$first" ] || continue
      whl=${first%.part-000}; cat "$whl".part-* > "$whl" && rm -f "$whl".part-*
    done
    cd - > /dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "/tmp/site_$engine" /tmp/wheels_"$engine"/*.whl || exit 1
    if [ ! -d /tmp/site_common/agentrl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_common \
        .wd1/*.whl || exit 1
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site_common \
        . environments/calculator 2>&1 | tail -2
    fi
    echo "installed $engine: $(ls "/tmp/site_$engine" | grep -c dist-info) distributions"
    ;;
  env)
    # agentrl from the checkout comes first, so the code under test is the code sent with the call
    echo "export PYTHONPATH=$PWD:/tmp/site_$1:/tmp/site_common HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 AGENTRL_SITE=$1"
    [ "$1" = vllm ] && echo "export VLLM_USE_FLASHINFER_SAMPLER=0"
    ;;
  background)
    name=$1; shift
    mkdir -p /tmp/bg
    setsid nohup bash -c "$*; echo \"exit \$?\" > /tmp/bg/$name.status" > "/tmp/bg/$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!)"
    ;;
  wait)
    for _ in $(seq 1 "$2"); do [ -e "/tmp/bg/$1.status" ] && break; sleep 1; done
    [ -e "/tmp/bg/$1.status" ] && echo "$1: $(cat "/tmp/bg/$1.status")" || echo "$1: still running"
    ;;
  bench)
    engine=$1; shift
    eval "$(bash "$0" env "$engine")"
    case "$engine" in  # SGLang's fast default (no deterministic inference); vLLM compiled with CUDA graphs
      sglang) opts='{"sglang": {"enable_deterministic_inference": false, "allow_unseeded": true, "attention_backend": "fa3", "mem_fraction_static": 0.35}}' ;;
      vllm) opts='{"vllm": {"gpu_memory_utilization": 0.35}}' ;;
    esac
    mkdir -p /tmp/bg
    python3 bench/rollout.py --random-qwen2-0.5b --device cuda --dtype bfloat16 --backends "$engine" \
      --engine-options "$opts" --hf-repeats 1 --repeats 2 --json "/tmp/bg/rollout_$engine.json" "$@"
    ;;
  bench3)
    # One bench/rollout.py run, one table: HF generate and the built-in engine in this process, SGLang and
    # vLLM each in a child process with its own install folder (--backend-site), one after the other.
    export PYTHONPATH=$PWD:/tmp/site_common HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
    opts='{"sglang": {"enable_deterministic_inference": false, "allow_unseeded": true, "attention_backend": "fa3", "mem_fraction_static": 0.35}, "vllm": {"gpu_memory_utilization": 0.35}}'
    mkdir -p /tmp/bg
    python3 bench/rollout.py --random-qwen2-0.5b --device cuda --dtype bfloat16 --backends sglang,vllm \
      --backend-site sglang=/tmp/site_sglang --backend-site vllm=/tmp/site_vllm \
      --engine-options "$opts" --hf-repeats 1 --repeats 2 --json /tmp/bg/rollout_three.json "$@"
    ;;
  long)
    # bench/rollout_long.py (issue 14's shapes): the built-in engine in this process, SGLang in a child process
    # with its install folder, one table; run it detached (`background long bash bench/gpu_backends.sh long`)
    export PYTHONPATH=$PWD:/tmp/site_common HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    opts='{"sglang": {"enable_deterministic_inference": false, "allow_unseeded": true, "attention_backend": "fa3", "mem_fraction_static": 0.35}}'
    mkdir -p /tmp/bg
    python3 bench/rollout_long.py --device cuda --hf-repeats 0 --repeats 2 --backends sglang \
      --backend-site sglang=/tmp/site_sglang --engine-options "$opts" --json /tmp/bg/long.json "$@"
    ;;
  frontend)
    # vLLM driven directly (offline LLM; AsyncLLM streams), workload (a), to place agentrl's vllm column
    eval "$(bash "$0" env vllm)"
    mkdir -p /tmp/bg
    python3 bench/vllm_frontend.py --mode llm --json /tmp/bg/vllm_frontend.json
    for ctx in ENGINE_CONTEXT LLM_CLASS; do
      python3 bench/vllm_frontend.py --mode async --usage-context $ctx --json /tmp/bg/vllm_frontend.json
    done
    ;;
  table)
    python3 - <<'PY'
import glob, json
rows = [r for f in sorted(glob.glob("/tmp/bg/rollout_*.json")) for r in json.load(open(f))]
cols, table = [], {}
for r in rows:
    name = r["backend"] if r["backend"] not in ("embedded", "hf_generate") else r["backend"]
    table.setdefault(r["workload"], {}).setdefault(name, []).append(r["tok_per_s"])
    cols += [name] if name not in cols else []
print("| workload | " + " | ".join(cols) + " |")
print("|---|" + "---:|" * len(cols))
for w, c in table.items():
    print(f"| {w} | " + " | ".join("/".join(f"{v:,.0f}" for v in c.get(k, [])) or "-" for k in cols) + " |")
PY
    ;;
  collect)
    mkdir -p "$OUT/bg"
    cp -r /tmp/bg/. "$OUT/bg/" 2>/dev/null
    for f in /tmp/bg/*.status; do [ -e "$f" ] && echo "$(basename "$f" .status): $(cat "$f")"; done
    for f in /tmp/bg/*.log; do [ -e "$f" ] && { echo "== $f (tail)"; tail -25 "$f"; }; done
    ;;
  *) echo "unknown step $what" >&2; exit 2 ;;
esac
