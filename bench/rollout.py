"""Rollout throughput: the built-in engine vs Hugging Face `generate`, same model, same prompts, one run.

Workloads (every response is exactly `new` tokens long: no stop tokens, HF gets `min_new_tokens`):

- (a) `plain`: P random prompts of `prompt_len` tokens, `new` sampled tokens each.
  Both sides sample from the full distribution (`temperature=1`, HF with `top_k=0`, since its
  default `top_k=50` would add work the engine does not do).
- (b) `grpo`: G prompts x n samples (the GRPO shape); the engine gets the G*n requests at once and
  should prefill each prompt once (its prefix-cache hit rate is printed); HF generates the
  G*n rows as one batch (`num_return_sequences=n`).
- (c) `turns`: E episodes of 4 turns: each turn appends `obs` random observation tokens to the
  whole conversation so far and generates `turn_new` tokens. HF re-prefills the conversation
  every turn; the engine runs twice, with prefix caching on and off.

Output: one row per (workload, backend) with generated tokens/s and the ratio to HF `generate`.
Each measurement is repeated `--repeats` times after a warm-up, backends interleaved, and the
best run is kept (the CPU machines this runs on are shared, so the best run is the least noisy).

`--model-family` picks the architecture of the random model (default qwen2): the same shape
(tiny, or Qwen2-0.5B's with `--random-qwen2-0.5b`) in another family of the engine's table, so
numbers compare across families; `qwen3_moe` spreads the MLP over 64 experts, 8 per token, with
the active width of the dense MLP.

`--backends sglang` (or `vllm`, any name in the engine registry; `label=name` for a second variant)
adds a column per engine, built from `ENGINES` on the same model saved to a directory, with
`--engine-options '{"label": {...}}'` passed to its constructor (default mem_fraction_static 0.35 for
sglang, so it shares the GPU with the built-in engine); they are built first, before the built-in
engines take their share of the free memory.

Example:
    PYTHONPATH=. python bench/rollout.py --cpu-small                       # CPU, tiny quickstart shape
    PYTHONPATH=.:/tmp/site python3 bench/rollout.py --random-qwen2-0.5b --device cuda --backends sglang
    PYTHONPATH=. python bench/rollout.py --random-qwen2-0.5b --device cuda --dtype bfloat16
    PYTHONPATH=. python bench/rollout.py --random-qwen2-0.5b --model-family qwen3_moe --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import time
from dataclasses import dataclass, fields, replace

import torch

from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    prompts: int = 256
    prompt_len: int = 256
    new: int = 256
    groups: int = 32
    n: int = 8
    episodes: int = 64
    turns: int = 4
    obs: int = 32
    turn_new: int = 64


CPU_SMALL = Sizes(prompts=64, prompt_len=64, new=64, groups=8, n=8, episodes=16, turns=4, obs=32, turn_new=32)


# (config class, model class) of each family `--model-family` can build, all from `transformers`.
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"), "granite": ("GraniteConfig", "GraniteForCausalLM"),
}


def build_model(args):
    """A local HF model, or a random one of `--model-family` in the Qwen2-0.5B shape or (default)
    the quickstart tiny shape."""
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    if args.random_qwen2_0_5b:
        shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096)
    else:
        from agentrl.recipes.tiny_model import TinyModelShape

        s = TinyModelShape()
        shape = dict(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                     num_key_value_heads=s.num_kv_heads, intermediate_size=s.intermediate_size,
                     vocab_size=s.vocab_size, max_position_embeddings=s.max_positions)
    shape.update(tie_word_embeddings=True, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if args.model_family == "qwen3_moe":  # the dense width spread over 8 active experts of 64
        shape.update(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=shape["intermediate_size"] // 8)
    config_cls, model_cls = FAMILIES[args.model_family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**shape)).to(DTYPES[args.dtype])


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def hf_generate(model, prompts: list[list[int]], new: int, num_return: int = 1) -> int:
    """Batched `generate`, left padded, sampling, exactly `new` tokens per row; returns tokens generated."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    dev = model.device
    with torch.no_grad():
        out = model.generate(ids.to(dev), attention_mask=mask.to(dev), do_sample=True, max_new_tokens=new,
                             min_new_tokens=new, num_return_sequences=num_return, pad_token_id=0, eos_token_id=None,
                             top_k=0)
    return (out.shape[1] - width) * out.shape[0]


def synchronous(engine: EmbeddedEngine, fn):
    """`fn` with the engine's async (speculative) steps turned off: the one-step-at-a-time baseline."""
    def run():
        saved, engine.async_steps = engine.async_steps, False
        try:
            return fn()
        finally:
            engine.async_steps = saved
    return run


def engine_generate(engine: EmbeddedEngine, prompts: list[list[int]], new: int) -> int:
    engine.reset_prefix_cache()  # every run starts cold, like HF (every backend column has it)

    async def run():
        sp = SamplingParams(temperature=1.0, max_tokens=new)
        return await asyncio.gather(*(engine.generate(p, sp) for p in prompts))

    return sum(len(g.token_ids) for g in asyncio.run(run()))


@functools.lru_cache(maxsize=8)
def _observations(count: int, turns: int, obs: int, vocab: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Every turn's observation tokens, drawn once (the warm-up's call), so timed runs do not pay for the
    draws (32 episodes × 512 tokens cost ~10 ms a turn in Python, charged to whichever engine ran)."""
    rng = random.Random(1)
    return tuple(tuple(tuple(rng.randrange(3, vocab) for _ in range(obs)) for _ in range(count)) for _ in range(turns))


def episodes(generate, starts: list[list[int]], turns: int, obs: int, new: int, vocab: int) -> int:
    """Multi-turn: each turn = conversation + new observation tokens; `generate(prompts) -> outputs`."""
    convs = [list(p) for p in starts]
    total = 0
    for observations in _observations(len(starts), turns, obs, vocab):
        for c, o in zip(convs, observations):
            c += o
        outs = generate(convs, new)
        for c, o in zip(convs, outs):
            c += o
        total += sum(len(o) for o in outs)
    return total


def hf_turn(model, new):
    def gen(convs, _new):
        width = max(len(c) for c in convs)
        ids = torch.tensor([[0] * (width - len(c)) + c for c in convs], device=model.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in convs], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=0, eos_token_id=None, top_k=0)
        return out[:, width:].tolist()
    return gen


def engine_turn(engine):
    engine.reset_prefix_cache()  # each episode batch starts cold; reuse is only within it

    def gen(convs, new):
        async def run():
            sp = SamplingParams(temperature=1.0, max_tokens=new)
            return await asyncio.gather(*(engine.generate(c, sp) for c in convs))
        return [list(g.token_ids) for g in asyncio.run(run())]
    return gen


def best_of(fns: dict, repeats: int, sync, warmups: dict | None = None,
            counts: dict[str, int] | None = None) -> dict[str, tuple[float, int]]:
    """Warm each fn up (with `warmups[name]` if given: a cheaper call), then run it `counts[name]`
    (default `repeats`) times, interleaved; keep each one's fastest run."""
    warmups, counts = warmups or {}, counts or {}
    for name, fn in fns.items():
        warmups.get(name, fn)()
    best: dict[str, tuple[float, int]] = {}
    for r in range(repeats):
        for name, fn in fns.items():
            if r >= counts.get(name, repeats):
                continue
            sync()
            t0 = time.perf_counter()
            tokens = fn()
            sync()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, tokens)
    return best


def report(workload: str, results: dict[str, tuple[float, int]], extra: dict[str, dict] | None = None) -> list[dict]:
    rows = []
    base = results["hf_generate"][1] / results["hf_generate"][0]
    for name, (dt, tokens) in results.items():
        row = dict(workload=workload, backend=name, tokens=tokens, seconds=round(dt, 3),
                   tok_per_s=round(tokens / dt, 1), vs_hf=round(tokens / dt / base, 2), **(extra or {}).get(name, {}))
        rows.append(row)
        info = "  ".join(f"{k}={v}" for k, v in (extra or {}).get(name, {}).items())
        print(f"{workload:7s} {name:22s} {tokens:8d} tok {dt:8.2f} s {tokens / dt:10.1f} tok/s "
              f"{tokens / dt / base:6.2f}x HF  {info}", flush=True)
    return rows


def hit_rate_since(engine: EmbeddedEngine, before: tuple[float, int]) -> float:
    """The engine's prompt cache-hit rate over the requests served since `before` = (cached, prompt tokens)."""
    cached = engine.stats.extra.get("cached_prompt_tokens", 0.0) - before[0]
    return round(cached / max(1, engine.stats.prompt_tokens - before[1]), 4)


def snapshot(engine: EmbeddedEngine) -> tuple[float, int]:
    return engine.stats.extra.get("cached_prompt_tokens", 0.0), engine.stats.prompt_tokens


def model_dir(args, model) -> str:
    """`--model`, or `model` saved once to a temporary directory (engine constructors take a path)."""
    import tempfile

    if not args.model:
        args.model = tempfile.mkdtemp(prefix="agentrl-bench-model-")
        model.save_pretrained(args.model)
    return args.model


def backend_columns(args, model, longest: int, sites: dict[str, str]) -> dict:
    """The engines of `--backends` that run in this process (not in `sites`), by label, on `model`."""
    from agentrl.rollout.engine import ENGINES

    items = [i for i in args.backends.split(",") if i and (i.rpartition("=")[0] or i) not in sites]
    if not items:
        return {}
    path = model_dir(args, model)
    options = json.loads(args.engine_options)
    columns = {}
    for item in items:
        label, _, name = item.rpartition("=")
        label = label or name
        opts = {**({"mem_fraction_static": 0.35} if name == "sglang" else {}), **options.get(label, {})}
        columns[label] = ENGINES.get(name)(path, device=args.device, dtype=DTYPES[args.dtype],
                                           max_model_len=longest + 8, **opts)
    return columns


def run_plain(model, engine, sz: Sizes, repeats: int, sync, hf_runs: dict, compare_sync: bool = False,
              others: dict | None = None) -> list[dict]:
    prompts = random_prompts(sz.prompts, sz.prompt_len, model.config.vocab_size, 0)
    fns = {"hf_generate": lambda: hf_generate(model, prompts, sz.new),
           "embedded": lambda: engine_generate(engine, prompts, sz.new),
           **{k: functools.partial(engine_generate, e, prompts, sz.new) for k, e in (others or {}).items()}}
    if compare_sync:
        fns["embedded_sync_steps"] = synchronous(engine, fns["embedded"])
    res = best_of(fns, repeats, sync, {"hf_generate": lambda: hf_generate(model, prompts[:8], 4)}, hf_runs)
    return report(f"a:{sz.prompts}x{sz.prompt_len}x{sz.new}", res)


def run_grpo(model, engine, sz: Sizes, repeats: int, sync, hf_runs: dict, others: dict | None = None) -> list[dict]:
    groups = random_prompts(sz.groups, sz.prompt_len, model.config.vocab_size, 1)
    expanded = [p for p in groups for _ in range(sz.n)]
    engines = {"embedded": engine, **(others or {})}
    before = {k: snapshot(e) for k, e in engines.items()}
    res = best_of({"hf_generate": lambda: hf_generate(model, groups, sz.new, num_return=sz.n),
                   **{k: functools.partial(engine_generate, e, expanded, sz.new) for k, e in engines.items()}},
                  repeats, sync, {"hf_generate": lambda: hf_generate(model, groups[:2], 4, num_return=sz.n)}, hf_runs)
    extra = {k: {"prompt_cache_hit_rate": hit_rate_since(e, before[k]), "ideal": round((sz.n - 1) / sz.n, 4)}
             for k, e in engines.items()}
    return report(f"b:{sz.groups}x{sz.n}", res, extra)


def run_turns(model, engine, no_cache, sz: Sizes, repeats: int, sync, hf_runs: dict,
              compare_sync: bool = False, others: dict | None = None) -> list[dict]:
    vocab = model.config.vocab_size
    starts = random_prompts(sz.episodes, sz.prompt_len, vocab, 2)

    def play(gen):
        return episodes(gen, starts, sz.turns, sz.obs, sz.turn_new, vocab)

    before = {k: snapshot(e) for k, e in {"embedded": engine, **(others or {})}.items()}
    fns = {"hf_generate": lambda: play(hf_turn(model, sz.turn_new)),
           "embedded": lambda: play(engine_turn(engine)),
           "embedded_no_prefix_cache": lambda: play(engine_turn(no_cache)),
           **{k: (lambda e=e: play(engine_turn(e))) for k, e in (others or {}).items()}}
    if compare_sync:
        fns["embedded_sync_steps"] = synchronous(engine, fns["embedded"])
        fns["embedded_no_prefix_cache_sync_steps"] = synchronous(no_cache, fns["embedded_no_prefix_cache"])
    res = best_of(fns, repeats, sync,
                  {"hf_generate": lambda: episodes(hf_turn(model, 4), starts[:4], 1, sz.obs, 4, vocab)}, hf_runs)
    extra = {"prompt_cache_hit_rate": hit_rate_since(engine, before["embedded"]),
             "speedup_vs_no_cache": round(res["embedded_no_prefix_cache"][0] / res["embedded"][0], 2)}
    if compare_sync:
        extra["speedup_vs_no_cache_sync_steps"] = round(
            res["embedded_no_prefix_cache_sync_steps"][0] / res["embedded_sync_steps"][0], 2)
    return report(f"c:{sz.episodes}x{sz.turns}t", res, {"embedded": extra, **{
        k: {"prompt_cache_hit_rate": hit_rate_since(e, before[k])} for k, e in (others or {}).items()}})


def profile_engine(model, engine: EmbeddedEngine, sz: Sizes) -> None:
    """Print where one engine run of (a) spends device and host time (torch profiler, all threads)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(sz.prompts, sz.prompt_len, model.config.vocab_size, 3)
    engine_generate(engine, prompts, sz.new)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        tokens = engine_generate(engine, prompts, sz.new)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    avgs = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in avgs)
    print(f"profile: {tokens} tokens in {wall:.3f} s (profiled); device busy {device_us / 1e6:.3f} s", flush=True)
    print(avgs.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(avgs.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local Hugging Face model directory")
    ap.add_argument("--random-qwen2-0.5b", dest="random_qwen2_0_5b", action="store_true", help="random-init Qwen2-0.5B shape")
    ap.add_argument("--model-family", default="qwen2", choices=sorted(FAMILIES),
                    help="architecture of the random model (default qwen2; ignored with --model)")
    ap.add_argument("--cpu-small", action="store_true", help="CPU sizes: 64x64x64, 8x8 GRPO, 16 episodes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--workloads", default="plain,grpo,turns")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, help="timed runs of HF generate (default: --repeats); its "
                    "warm-up is a short call, so 1 costs one full HF run per workload")
    ap.add_argument("--plain-sweep", help="comma-separated prompt counts for workload (a), e.g. 256,64 "
                    "(default: --prompts)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run the engine without CUDA graphs")
    ap.add_argument("--compare-sync", action="store_true", help="also time the engine with async (speculative) "
                    "steps off on (a) and (c), in the same run")
    ap.add_argument("--profile", action="store_true", help="after the workloads, profile one engine run of (a) "
                    "with 32 new tokens (torch profiler, top ops by device time)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--step-tokens", type=int, help="the built-in engine's max_step_tokens (its default if unset)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--backends", default="", help="more engine columns, by registry name (label=name for a "
                    "variant), e.g. sglang,vllm")
    ap.add_argument("--engine-options", default="{}", help="JSON: constructor options by backend label")
    ap.add_argument("--backend-site", action="append", default=[], metavar="LABEL=PATH[:PATH]",
                    help="time that backend in a child process with PATH first on its import path (an engine's "
                         "own install folder: SGLang and vLLM cannot share a process), after this process's columns")
    for f in fields(Sizes):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, help=f"override the size {f.name}")
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = CPU_SMALL if args.cpu_small else Sizes()
    sz = replace(sz, **{f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name) is not None})
    model = build_model(args).to(args.device).eval()
    longest = max(sz.prompt_len + sz.new, sz.prompt_len + sz.turns * (sz.obs + sz.turn_new))
    sweep = [int(p) for p in args.plain_sweep.split(",")] if args.plain_sweep else [sz.prompts]
    batch = max(*sweep, sz.groups * sz.n, sz.episodes)
    graphs = not args.no_cuda_graphs
    from rollout_columns import parse_sites, run_isolated

    sites = parse_sites(args.backend_site)
    others = backend_columns(args, model, longest, sites)  # first: they size their memory from what is free
    step = {} if args.step_tokens is None else {"max_step_tokens": args.step_tokens}
    engine = EmbeddedEngine(model, device=args.device, dtype=DTYPES[args.dtype], max_model_len=longest + 8,
                            max_batch_size=batch, cuda_graphs=graphs, **step)
    no_cache = EmbeddedEngine(model, device=args.device, dtype=DTYPES[args.dtype], max_model_len=longest + 8,
                              max_batch_size=batch, enable_prefix_caching=False, cuda_graphs=graphs, **step)
    hf_runs = {"hf_generate": args.hf_repeats or args.repeats}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"family={model.config.model_type} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M sizes={sz}", flush=True)
    rows: list[dict] = []
    work = args.workloads.split(",")
    if "plain" in work:
        for p in sweep:
            rows += run_plain(model, engine, replace(sz, prompts=p), args.repeats, sync, hf_runs, args.compare_sync,
                              others)
    if "grpo" in work:
        rows += run_grpo(model, engine, sz, args.repeats, sync, hf_runs, others)
    if "turns" in work:
        rows += run_turns(model, engine, no_cache, sz, args.repeats, sync, hf_runs, args.compare_sync, others)
    print("engine stats:", {k: round(v, 3) for k, v in engine.stats.extra.items()}, flush=True)
    for label, other in others.items():
        print(f"{label} stats:", {k: round(v, 3) for k, v in other.stats.extra.items()}, flush=True)
        other.close()
    if args.profile:
        profile_engine(model, engine, replace(sz, prompts=sweep[0], new=32))
    if sites:
        del engine, no_cache, others  # free this process's KV caches for the children's engines
        rows += run_isolated(args, model_dir(args, model), sites, sz, sweep, longest + 8, model.config.vocab_size,
                             rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
