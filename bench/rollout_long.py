"""Long contexts: the built-in engine at agent lengths (4k-32k tokens), its prefill rate against the matmul
ceiling, and other engines side by side (issue 14's shapes).

Shapes (new tokens are sampled at temperature 1, every response exactly its length):
- L1: 64 prompts x 4,096 tokens -> 256 new
- L2: 32 episodes x 8 turns: a 2,048-token start, +512 observation and 256 new tokens per turn (last turn ~7.7k)
- L3: 16 prompts x 16,000 -> 256
- L32k: 8 prompts x 32,000 -> 256
`--cpu-small` scales them down (about 1/8 of the lengths, fewer prompts) for a CPU run against HF `generate`.

Per shape and engine: new tokens/s (best of `--repeats` after a warm-up, cold prefix cache each run) and,
for the single-turn shapes, the prefill alone (the same prompts, one new token): prompt tokens/s and the
model FLOPs that rate does as a fraction of this device's matmul rate, measured in the same run
(`matmul_tflops`: a large square matmul in the model's dtype). Prefill FLOPs per prompt of T tokens:
2 x (matmul parameters of the layers) x T for the projections and MLP, plus 2 x Hq x D x T^2 per layer
for causal attention (QK^T and PV, half of each T x T product); the LM head counts once per prompt.

`--step-tokens 2048,4096,8192` times the built-in engine with each `max_step_tokens` (the chunked-prefill
budget of one engine step) as its own column. `--backends sglang --backend-site sglang=PATH` adds an engine
timed in a child process (bench/rollout_backend.py's mechanism), as bench/rollout.py does.

    PYTHONPATH=. python bench/rollout_long.py --cpu-small                               # CPU, vs HF generate
    PYTHONPATH=. python bench/rollout_long.py --device cuda --hf-repeats 0 --step-tokens 4096,8192,16384
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import (DTYPES, build_model, engine_turn, episodes, hf_generate, hf_turn,  # noqa: E402
                     random_prompts)
from rollout_columns import parse_sites, print_table  # noqa: E402

from agentrl.rollout.engine import SamplingParams  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    prompts: int            # prompts, or episodes for a multi-turn shape
    prompt_len: int         # prompt length, or the episode's start
    new: int                # new tokens per prompt, or per turn
    turns: int = 1          # > 1: a multi-turn shape
    obs: int = 0            # observation tokens added before every turn

    @property
    def longest(self) -> int:
        return self.prompt_len + self.turns * (self.obs + self.new)


GPU_SHAPES = (Shape("L1", 64, 4096, 256), Shape("L2", 32, 2048, 256, turns=8, obs=512),
              Shape("L3", 16, 16000, 256), Shape("L32k", 8, 32000, 256))
CPU_SHAPES = (Shape("L1", 8, 512, 32), Shape("L2", 4, 256, 32, turns=4, obs=64),
              Shape("L3", 2, 2000, 32), Shape("L32k", 1, 4000, 32))


def prefill_flops(config, prompt_len: int) -> float:
    """Model FLOPs to prefill one prompt (projections, MLP, causal attention, the last token's LM head)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config.intermediate_size
    linear = 2 * layers * per_layer * prompt_len
    attention = layers * 2 * heads * head_dim * prompt_len * prompt_len
    return linear + attention + 2 * hidden * config.vocab_size


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """This device's rate on a large square matmul in `dtype` (the ceiling the prefill rate is held to)."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps = 20 if device.startswith("cuda") else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def engine_tokens(engine, prompts: list[list[int]], new: int) -> int:
    engine.reset_prefix_cache()

    async def run():
        sp = SamplingParams(temperature=1.0, max_tokens=new)
        return await asyncio.gather(*(engine.generate(p, sp) for p in prompts))
    return sum(len(g.token_ids) for g in asyncio.run(run()))


def best(fn, repeats: int, sync) -> tuple[float, int]:
    fn()  # warm-up (graph capture, compilation, allocations)
    runs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        tokens = fn()
        sync()
        runs.append((time.perf_counter() - t0, tokens))
    return min(runs)


def profile_shapes(engine, shapes, vocab: int) -> None:
    """Device time of the built-in engine by kernel family, per shape: the prefill alone and the whole run."""
    from profile_decode import device_gaps, kernel_seconds

    families = (("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas")), ("attn prefill", ("prefill",)),
                ("attn decode", ("decode_split", "decode_merge")), ("write_kv", ("write_kv",)),
                ("rotary", ("rotary",)), ("sampling", ("sample", "argmax", "topk", "softmax")))
    for s in shapes:
        starts = random_prompts(s.prompts, s.prompt_len, vocab, 0 if s.turns == 1 else 2)
        runs = ([("prefill", lambda: engine_tokens(engine, starts, 1))] if s.turns == 1 else []) + [
            ("whole", (lambda: engine_tokens(engine, starts, s.new)) if s.turns == 1 else
             (lambda: episodes(engine_turn(engine), starts, s.turns, s.obs, s.new, vocab)))]
        for name, fn in runs:
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            kern = kernel_seconds(fn)
            by = {}
            for k, sec in kern.items():
                fam = next((f for f, keys in families if any(x in k.lower() for x in keys)), "other")
                by[fam] = by.get(fam, 0.0) + sec
            print(f"profile {s.name} {name}: wall {wall * 1e3:.0f} ms, kernels {sum(kern.values()) * 1e3:.0f} ms: "
                  + ", ".join(f"{f} {v * 1e3:.0f}" for f, v in sorted(by.items(), key=lambda kv: -kv[1])), flush=True)
            for k, sec in sorted(kern.items(), key=lambda kv: -kv[1])[:8]:
                print(f"    {sec * 1e3:8.1f} ms  {k[:100]}")
            device_gaps(fn, threshold_us=500.0)


def time_shapes(label: str, engine, shapes, vocab: int, repeats: int, sync, config, tflops: float) -> list[dict]:
    """Rows of one engine (or HF `generate` when `engine` is the string "hf" and config's model is given)."""
    rows = []
    for s in shapes:
        if s.turns > 1:
            starts = random_prompts(s.prompts, s.prompt_len, vocab, 2)
            gen = hf_turn(engine[1], s.new) if isinstance(engine, tuple) else None

            def play(gen=gen):
                return episodes(gen or engine_turn(engine), starts, s.turns, s.obs, s.new, vocab)
            dt, tokens = best(play, repeats, sync)
            rows.append(dict(workload=s.name, backend=label, tokens=tokens, seconds=round(dt, 3),
                             tok_per_s=round(tokens / dt, 1)))
            continue
        prompts = random_prompts(s.prompts, s.prompt_len, vocab, 0)
        if isinstance(engine, tuple):  # ("hf", model)
            def gen(n, p=prompts):
                return hf_generate(engine[1], p, n)
        else:
            def gen(n, p=prompts):
                return engine_tokens(engine, p, n)
        dt, tokens = best(lambda: gen(s.new), repeats, sync)
        rows.append(dict(workload=s.name, backend=label, tokens=tokens, seconds=round(dt, 3),
                         tok_per_s=round(tokens / dt, 1)))
        pdt, _ = best(lambda: gen(1), repeats, sync)
        flops = prefill_flops(config, s.prompt_len) * s.prompts
        rows.append(dict(workload=f"{s.name} prefill", backend=label, tokens=s.prompts * s.prompt_len,
                         seconds=round(pdt, 3), tok_per_s=round(s.prompts * s.prompt_len / pdt, 1),
                         model_tflops=round(flops / pdt / 1e12, 2), of_matmul_ceiling=round(flops / pdt / 1e12 / tflops, 3)))
    for r in rows:
        extra = "  ".join(f"{k}={r[k]}" for k in ("model_tflops", "of_matmul_ceiling") if k in r)
        print(f"{r['workload']:12s} {label:22s} {r['tokens']:9d} tok {r['seconds']:8.2f} s "
              f"{r['tok_per_s']:11.1f} tok/s  {extra}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="the scaled-down shapes (CPU)")
    ap.add_argument("--shapes", default="", help="comma-separated subset of L1,L2,L3,L32k")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-repeats", type=int, default=1, help="timed runs of HF generate; 0 leaves HF out")
    ap.add_argument("--step-tokens", default="", help="comma-separated max_step_tokens values for the built-in engine")
    ap.add_argument("--backends", default="", help="engines timed in child processes (with --backend-site)")
    ap.add_argument("--backend-site", action="append", default=[], metavar="LABEL=PATH")
    ap.add_argument("--engine-options", default="{}", help="JSON: constructor options by backend label")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compare-async-prefill", action="store_true",
                    help="also time the built-in engine with async_prefill off (its own column)")
    ap.add_argument("--profile", action="store_true", help="CUDA: device time by kernel family per shape (built-in)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # label=name: time only that engine (a child process)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in (CPU_SHAPES if args.cpu_small else GPU_SHAPES)
              if not args.shapes or s.name in args.shapes.split(",")]
    longest = max(s.longest for s in shapes) + 8
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tflops = matmul_tflops(args.device, DTYPES[args.dtype])
    if args.child:
        rows = run_child(args, shapes, longest, sync, tflops)
    else:
        rows = run_parent(args, shapes, longest, sync, tflops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def run_parent(args, shapes, longest, sync, tflops) -> list[dict]:
    from agentrl.rollout.backends.embedded import EmbeddedEngine

    build_args = argparse.Namespace(model=None, random_qwen2_0_5b=not args.cpu_small, model_family="qwen2",
                                    dtype=args.dtype)
    model = build_model(build_args)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, longest)
    model = model.to(args.device).eval()
    config, vocab = model.config, model.config.vocab_size
    print(f"device={args.device} dtype={args.dtype} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"matmul_tflops={tflops:.1f} shapes={[s.name for s in shapes]}", flush=True)
    rows = []
    if args.hf_repeats:
        rows += time_shapes("hf_generate", ("hf", model), shapes, vocab, args.hf_repeats, sync, config, tflops)
    batch = max(s.prompts for s in shapes)
    columns = [("embedded" if t is None else f"embedded_step{t}", {} if t is None else {"max_step_tokens": t})
               for t in [int(t) for t in args.step_tokens.split(",") if t] or [None]]
    if args.compare_async_prefill:
        columns.append(("embedded_no_async_prefill", {**columns[0][1], "async_prefill": False}))
    for label, opts in columns:
        engine = EmbeddedEngine(model, device=args.device, dtype=DTYPES[args.dtype], max_model_len=longest,
                                max_batch_size=batch, **opts)
        if args.profile:
            profile_shapes(engine, shapes, vocab)
        rows += time_shapes(label, engine, shapes, vocab, args.repeats, sync, config, tflops)
        print(f"{label} stats:", {k: round(v, 3) for k, v in engine.stats.extra.items()}, flush=True)
        engine.close()
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    sites = parse_sites(args.backend_site)
    items = [i for i in args.backends.split(",") if i]
    if items:
        path = tempfile.mkdtemp(prefix="agentrl-bench-long-model-")
        model.save_pretrained(path)
        del model
        rows += [r for item in items for r in child_rows(args, item, sites, path)]
    for r in rows:
        r["matmul_tflops"] = round(tflops, 1)
    print_table(rows)
    return rows


def child_rows(args, item: str, sites: dict[str, str], model_path: str) -> list[dict]:
    label = item.rpartition("=")[0] or item
    out = tempfile.mktemp(suffix=".json", prefix=f"agentrl-bench-long-{label}-")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", item, "--model", model_path, "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--engine-options", args.engine_options,
           "--json", out] + (["--cpu-small"] if args.cpu_small else []) + (["--shapes", args.shapes] if args.shapes else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, sites.get(label, ""), os.environ.get("PYTHONPATH", "")) if p)
    print(f"-- {label}: a child process with PYTHONPATH={path}", flush=True)
    if subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}).returncode != 0:
        print(f"-- {label}: the child process failed; no column", flush=True)
        return []
    with open(out) as f:
        rows = json.load(f)
    os.unlink(out)
    return rows


def run_child(args, shapes, longest, sync, tflops) -> list[dict]:
    import transformers

    from agentrl.rollout.engine import ENGINES

    label, _, name = args.child.rpartition("=")
    label = label or name
    config = transformers.AutoConfig.from_pretrained(args.model)
    opts = {**({"mem_fraction_static": 0.35} if name == "sglang" else {}),
            **json.loads(args.engine_options).get(label, {})}
    engine = ENGINES.get(name)(args.model, device=args.device, dtype=DTYPES[args.dtype], max_model_len=longest, **opts)
    try:
        return time_shapes(label, engine, shapes, config.vocab_size, args.repeats, sync, config, tflops)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
