"""One engine column of bench/rollout.py, timed in a process of its own.

bench/rollout.py runs this when a backend is given an install folder (`--backend-site sglang=/tmp/site_sglang`):
SGLang 0.5.17 and vLLM 0.24.0 pin different versions of packages they share, so they cannot be imported into
one process, and an engine's scheduler processes would otherwise keep running beside the other columns'
timings. The child gets the parent's saved model, sizes and prompts (same seeds), times the same workloads
the same way (`best_of`, cold prefix cache per run) and writes its rows as JSON; the parent adds the ratios
to HF `generate` and the built-in engine and prints every column in one table.

Not meant to be run by hand; the parent's command line is what to run:
    python3 bench/rollout.py --random-qwen2-0.5b --device cuda --backends sglang,vllm \
        --backend-site sglang=/tmp/site_sglang:/tmp/site_common --backend-site vllm=/tmp/site_vllm:/tmp/site_common
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import (DTYPES, Sizes, best_of, engine_generate, engine_turn, episodes,  # noqa: E402
                     hit_rate_since, random_prompts, snapshot)


def time_backend(engine, vocab: int, sz: Sizes, workloads: list[str], sweep: list[int], repeats: int,
                 label: str) -> list[dict]:
    """The rows (workload, backend, tokens, seconds, tok_per_s, hit rates) of one engine."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rows = []

    def row(workload, res, **extra):
        dt, tokens = res[label]
        rows.append(dict(workload=workload, backend=label, tokens=tokens, seconds=round(dt, 3),
                         tok_per_s=round(tokens / dt, 1), **extra))

    if "plain" in workloads:
        for p in sweep:
            prompts = random_prompts(p, sz.prompt_len, vocab, 0)
            res = best_of({label: functools.partial(engine_generate, engine, prompts, sz.new)}, repeats, sync)
            row(f"a:{p}x{sz.prompt_len}x{sz.new}", res)
    if "grpo" in workloads:
        expanded = [g for g in random_prompts(sz.groups, sz.prompt_len, vocab, 1) for _ in range(sz.n)]
        before = snapshot(engine)
        res = best_of({label: functools.partial(engine_generate, engine, expanded, sz.new)}, repeats, sync)
        row(f"b:{sz.groups}x{sz.n}", res, prompt_cache_hit_rate=hit_rate_since(engine, before),
            ideal=round((sz.n - 1) / sz.n, 4))
    if "turns" in workloads:
        starts = random_prompts(sz.episodes, sz.prompt_len, vocab, 2)
        before = snapshot(engine)
        res = best_of({label: lambda: episodes(engine_turn(engine), starts, sz.turns, sz.obs, sz.turn_new, vocab)},
                      repeats, sync)
        row(f"c:{sz.episodes}x{sz.turns}t", res, prompt_cache_hit_rate=hit_rate_since(engine, before))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", required=True, help="label=registry name")
    ap.add_argument("--device", required=True)
    ap.add_argument("--dtype", required=True, choices=sorted(DTYPES))
    ap.add_argument("--options", default="{}", help="JSON: the engine constructor's options")
    ap.add_argument("--sizes", required=True, help="JSON: the Sizes fields")
    ap.add_argument("--workloads", required=True)
    ap.add_argument("--sweep", required=True, help="comma-separated prompt counts of workload (a)")
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--json", required=True, help="write the rows here")
    args = ap.parse_args()
    from agentrl.rollout.engine import ENGINES

    label, _, name = args.backend.rpartition("=")
    label = label or name
    engine = ENGINES.get(name)(args.model, device=args.device, dtype=DTYPES[args.dtype],
                               max_model_len=args.max_model_len, **json.loads(args.options))
    try:
        rows = time_backend(engine, args.vocab, Sizes(**json.loads(args.sizes)), args.workloads.split(","),
                            [int(p) for p in args.sweep.split(",")], args.repeats, label)
        print(f"{label} stats:", {k: round(v, 3) for k, v in engine.stats.extra.items()}, flush=True)
    finally:
        engine.close()
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
