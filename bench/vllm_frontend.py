"""Where vLLM's time goes under agentrl: vLLM driven directly, without agentrl, on workload (a) of bench/rollout.py.

agentrl's vllm backend measured 15.8k new tokens/s at 256 prompts x 256 -> 256 on the H200 where SGLang did
51k (docs/benchmarks.md). This times the same prompts (same seeds, same random Qwen2-0.5B shape) with
vLLM's own front ends, to tell the engine's speed from the cost of how agentrl drives it:
- `--mode llm`: the offline `vllm.LLM.generate` on all prompts at once, without logprobs and with
  `logprobs=0` (the sampled token's logprob, what agentrl asks for);
- `--mode async`: `AsyncLLM` with one request stream per prompt (what agentrl's backend does), with
  `CUMULATIVE` outputs (agentrl's choice) and `FINAL_ONLY` (one output per request), its batch sized by
  `--usage-context` (vLLM's defaults differ by who starts the engine; see docs/benchmarks.md).
Both with `logprobs_mode=processed_logprobs` and prefix caching, as agentrl configures them. vLLM only (GPU);
each mode in its own process (`bench/gpu_backends.sh frontend` runs both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import build_model, random_prompts  # noqa: E402


def saved_model() -> str:
    path = os.path.join(tempfile.gettempdir(), "agentrl-vllm-frontend-model")
    if not os.path.exists(os.path.join(path, "config.json")):
        args = argparse.Namespace(model=None, random_qwen2_0_5b=True, model_family="qwen2", dtype="bfloat16")
        build_model(args).save_pretrained(path)
    return path


def engine_kwargs(path: str, max_len: int) -> dict:
    return dict(model=path, skip_tokenizer_init=True, enable_prefix_caching=True, gpu_memory_utilization=0.35,
                max_model_len=max_len, logprobs_mode="processed_logprobs", dtype="bfloat16")


def timed(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        dt = time.perf_counter() - t0
        best = (dt, tokens) if best is None or dt < best[0] else best
    return best


def run_llm(prompts, new, repeats, path) -> list[dict]:
    import vllm

    llm = vllm.LLM(**engine_kwargs(path, len(prompts[0]) + new + 8))
    rows = []
    for name, logprobs in (("llm_no_logprobs", None), ("llm_logprobs0", 0)):
        sp = vllm.SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, logprobs=logprobs,
                                 detokenize=False)

        def go():
            llm.reset_prefix_cache()
            outs = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)
        dt, tokens = timed(go, repeats)
        rows.append(dict(variant=name, tokens=tokens, seconds=round(dt, 3), tok_per_s=round(tokens / dt, 1)))
    return rows


def run_async(prompts, new, repeats, path, usage: str) -> list[dict]:
    import vllm
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main() -> list[dict]:
        llm = AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**engine_kwargs(path, len(prompts[0]) + new + 8)),
                                        usage_context=UsageContext[usage])
        rows = []
        try:
            for name, kind in (("async_cumulative", RequestOutputKind.CUMULATIVE),
                               ("async_final_only", RequestOutputKind.FINAL_ONLY)):
                sp = vllm.SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, logprobs=0,
                                         detokenize=False, output_kind=kind)

                async def one(i, p):
                    last = None
                    async for out in llm.generate(vllm.TokensPrompt(prompt_token_ids=p), sp, f"{name}-{i}-{time.time()}"):
                        last = out
                    return len(last.outputs[0].token_ids)

                async def go():
                    await llm.reset_prefix_cache()
                    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
                await go()
                best = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    tokens = await go()
                    dt = time.perf_counter() - t0
                    best = (dt, tokens) if best is None or dt < best[0] else best
                rows.append(dict(variant=name, tokens=best[1], seconds=round(best[0], 3),
                                 tok_per_s=round(best[1] / best[0], 1)))
        finally:
            llm.shutdown()
        return rows
    return asyncio.run(main())


def main() -> None:
    # vLLM forks its engine core by default; on the H200 `LLM` hung at start-up that way (the parent had
    # imported torch and agentrl), and agentrl's backend spawns too (rollout/backends/vllm/inprocess.py).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["llm", "async"], required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--usage-context", default="LLM_CLASS", choices=["ENGINE_CONTEXT", "LLM_CLASS", "OPENAI_API_SERVER"],
                    help="async mode: the UsageContext vLLM sizes its batch by (agentrl's backend: LLM_CLASS; "
                         "AsyncLLM's own default ENGINE_CONTEXT gives 128 sequences, 2,048 tokens a step)")
    ap.add_argument("--json", help="append the rows to this JSON list")
    args = ap.parse_args()
    path = saved_model()
    prompts = random_prompts(args.prompts, args.prompt_len, 151936, 0)  # workload (a)'s prompts
    if args.mode == "llm":
        rows = run_llm(prompts, args.new, args.repeats, path)
    else:
        rows = run_async(prompts, args.new, args.repeats, path, args.usage_context)
        for r in rows:
            r["variant"] += f"_{args.usage_context.lower()}"
    for r in rows:
        print(f"{r['variant']:20s} {r['tokens']:8d} tok {r['seconds']:8.2f} s {r['tok_per_s']:10.1f} tok/s", flush=True)
    if args.json:
        old = json.load(open(args.json)) if os.path.exists(args.json) else []
        with open(args.json, "w") as f:
            json.dump(old + rows, f, indent=2)


if __name__ == "__main__":
    main()
