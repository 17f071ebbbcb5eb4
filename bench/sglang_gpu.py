"""The sglang backend on real SGLang 0.5.17, on the GPU device: one command, PASS/FAIL lines with numbers.

Parts (`--parts`, default all, in this order; each prints `PASS`/`FAIL`/`SKIP <part>: ...`):

- `conformance`: tests/rollout/test_conformance.py for the `sglang` backend, in-process, engine on
  CUDA, against HF float32 on the CPU, on the tiny model built on the CPU machine (`--tiny`). First in
  float32 with Triton attention (fa3 has no float32) and IEEE float32 dots, at the suite's CUDA
  tolerance (2e-3); if SGLang cannot run float32 there, again in bf16 at `--bf16-tol` (the bf16 bound of
  tests/rollout/test_engine_gpu.py), saying so.
- `episodes`: 32 three-turn tool episodes (8 groups x 4, identical first prompts within a group) through
  agentrl's agent loop on an in-process `SGLangEngine` (bf16, fa3, CUDA graphs) with a random
  Qwen2-0.5B-shaped model; every sampled token's logprob against the trainer's recomputation (one HF
  bf16 forward over the whole trajectory, `log_softmax(logits / T)` in float32). PASS: mean |diff| <
  0.05 and max < 1.0, no failed episode, at least 90% of them three turns (a turn ends at a stop token
  or after 64 tokens), and more than 30% of prompt tokens served from the radix cache.
- `update`: `update_weights` (tensors, in-process) with perturbed weights: greedy outputs change (all 4
  are expected to on the random model; PASS needs one), the new outputs' logprobs agree with HF on the
  new weights (same bf16 bound; the greedy prefix agreeing with HF's is printed), the version is
  reported, and the radix cache was flushed (a repeated prompt is not served from the old KV).
- `server`: `python -m sglang.launch_server` started by agentrl (`ServerSpec(launch=True)`), the HTTP
  client's greedy output equal to the in-process engine's on the tiny model, abort, an update through a
  safetensors folder, a kill of the server and its restart with the weights re-synced.

Run on the device (see docs/backends.md for the wheels):

    PYTHONPATH=.:/tmp/site python3 bench/sglang_gpu.py --tiny models/tiny-conf --json $OUT/sglang_gpu.json

`--cpu-dry-run` runs the same script on a CPU machine against the CPU tests' stand-in
(tests/rollout/sglang_protocol: agentrl's built-in engine behind SGLang's shapes, not SGLang) with the
tiny model in place of the 0.5B one; it checks the script, not SGLang.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
RESULTS: list[dict] = []


def report(part: str, ok: bool | None, **numbers) -> None:
    word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{word} {part}: {shown}", flush=True)
    RESULTS.append({"part": part, "result": word, **numbers})


# -- conformance ------------------------------------------------------------------------------------

def conformance(args) -> None:
    if args.cpu_dry_run:
        runs = [("protocol stand-in (CPU)", {}, {}, "sglang-protocol")]
    else:
        f32 = {"dtype": "float32", "attention_backend": "triton", "mem_fraction_static": 0.08,
               "disable_cuda_graph": True}
        bf16 = {**f32, "dtype": "bfloat16"}
        runs = [("float32", {"sglang": f32}, {"TRITON_F32_DEFAULT": "ieee"}, "sglang and not protocol"),
                ("bfloat16", {"sglang": bf16}, {"AGENTRL_TEST_TOL": str(args.bf16_tol)}, "sglang and not protocol")]
    for label, options, env, select in runs:
        t0 = time.perf_counter()
        # No -x: every case runs, and every failure is printed with its text.
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", "-o",
               "timeout=0", "tests/rollout/test_conformance.py", "-k", select]
        full_env = {**os.environ, **env, "AGENTRL_TEST_MODEL_DIR": os.path.abspath(args.tiny),
                    "AGENTRL_TEST_DEVICE": "cpu" if args.cpu_dry_run else "cuda",
                    "AGENTRL_TEST_ENGINE_OPTIONS": json.dumps(options)}
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        summary = next((line for line in reversed(tail) if " passed" in line or " failed" in line or "error" in line),
                       tail[-1] if tail else "")
        ok = proc.returncode == 0 and " passed" in summary
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in tail if line.startswith(("FAILED ", "ERROR "))]
        report(f"conformance[{label}]", ok, seconds=round(time.perf_counter() - t0, 1), summary=repr(summary),
               failed=failed)
        if not ok:  # the whole failures section (every failing case's assertion and captured output)
            start = next((i for i, line in enumerate(tail) if "= FAILURES =" in line or "= ERRORS =" in line), 0)
            shown = tail[start:]
            print("\n".join(shown if len(shown) <= 600 else shown[:300] + ["[...]"] + shown[-300:]), flush=True)
        if ok:
            return


# -- a model, an engine, and the trainer's recomputation ------------------------------------------

def qwen2_05b(work: str, tiny: str) -> str:
    """A random Qwen2-0.5B-shaped model (bf16) with the tiny model's tokenizer and chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = os.path.join(work, "qwen2-0.5b-random")
    if not os.path.exists(os.path.join(out, "config.json")):
        cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096,
                          tie_word_embeddings=True, eos_token_id=None, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(out)
        del model
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tiny, name)):
            shutil.copy(os.path.join(tiny, name), out)
    return out


def make_engine(args, model_dir: str, **options):
    from agentrl.rollout.backends.sglang import SGLangEngine

    if args.cpu_dry_run:  # the stand-in server (in-process weight updates need SGLang's own modules)
        sys.path.insert(0, os.path.join(REPO, "tests", "rollout"))
        from sglang_protocol import make_engine as standin_engine

        return standin_engine(model_dir, device="cpu", max_model_len=2048)
    options.setdefault("mem_fraction_static", 0.4)
    return SGLangEngine(model_dir, device="cuda", dtype=torch.bfloat16, **options)


def hf_model(args, model_dir: str):
    from transformers import AutoModelForCausalLM

    device, dtype = ("cpu", torch.float32) if args.cpu_dry_run else ("cuda", torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def recompute(hf, token_ids, temperature: float) -> torch.Tensor:
    """The trainer's logprobs: one forward over the sequence, log_softmax(logits / T) in float32. [T-1]"""
    ids = torch.tensor([list(token_ids)], device=hf.device)
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1].float()  # [T-1, V]
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)  # logprob of token t+1 given the tokens up to t


def diffs_stats(d: torch.Tensor) -> dict:
    d = d.float().cpu()
    return {"tokens": int(d.numel()), "mean_abs_diff": float(d.mean()), "p99_abs_diff": float(torch.quantile(d, 0.99)),
            "max_abs_diff": float(d.max())}


# -- episodes ---------------------------------------------------------------------------------------

def episodes(args, engine, hf, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    try:
        from agentrl.envs.core import Env, Message
        from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
        from agentrl.rollout.chat import ChatRenderer
    except ImportError as exc:  # the agent loop needs gymnasium and jsonschema (docs/backends.md: carry .wg)
        report("episodes", False, error=repr(f"agentrl's agent loop cannot be imported: {exc}"))
        return
    from agentrl.rollout.engine import SamplingParams

    class ThreeToolTurns(Env):
        """Three model turns: every action gets a tool result back, the third ends the episode."""

        def reset(self, *, seed=None, options=None):
            self.turn, self.seed = 0, seed
            question = " ".join(f"{(seed or 0) * 7 + i} plus {i * 3}" for i in range(24))
            return (Message("system", "You are a calculator agent. Call tools, then answer."),
                    Message("user", f"Add these: {question}")), {}

        def step(self, action):
            self.turn += 1
            if self.turn >= 3:
                return (), 1.0, True, False, {}
            return (Message("tool", f"result {self.turn}: {self.seed * 31 + self.turn}"),), 0.0, False, False, {}

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    renderer = ChatRenderer(tok)
    vocab = hf.config.vocab_size
    # Random weights rarely sample the end-of-turn token, so a turn also ends at any of 15% of the
    # vocabulary (a stop-token list, as a user may give): turns end by `stop`, as the loop needs.
    stops = tuple(sorted({renderer.end_of_turn_id, *range(vocab - vocab * 15 // 100, vocab)}))
    sampling = SamplingParams(temperature=1.0, max_tokens=64, stop_token_ids=stops, seed=1234)
    specs = [EpisodeSpec(seed=g, group_id=g, index=g * 4 + k) for g in range(8) for k in range(4)]
    before = dict(engine.stats.extra), engine.stats.prompt_tokens
    t0 = time.perf_counter()
    trajs = asyncio.run(run_episodes(engine, EnvPool(ThreeToolTurns), renderer, sampling,
                                     EpisodeLimits(max_turns=3, max_total_tokens=1024), specs))
    seconds = time.perf_counter() - t0
    failures = [t.failure for t in trajs if t.failure]
    three = sum(t.num_turns == 3 for t in trajs)
    diffs = []
    for t in trajs:
        ref = recompute(hf, t.token_ids, 1.0)  # [T-1]
        mask = torch.tensor(t.loss_mask[1:], dtype=torch.bool)
        got = torch.tensor(t.rollout_logprobs[1:], dtype=torch.float32)[mask]
        diffs.append((got - ref.cpu()[mask]).abs())
    stats = diffs_stats(torch.cat(diffs))
    cached = engine.stats.extra.get("cached_prompt_tokens", 0.0) - before[0].get("cached_prompt_tokens", 0.0)
    hit = cached / max(1, engine.stats.prompt_tokens - before[1])
    gated = engine.stats.extra.get("gated_requests", 0.0) - before[0].get("gated_requests", 0.0)
    ok = (not failures and three >= 0.9 * len(trajs) and stats["mean_abs_diff"] < 0.05
          and stats["max_abs_diff"] < 1.0 and hit > 0.3)
    report("episodes", ok, episodes=len(trajs), three_turn=three, failures=len(failures), seconds=round(seconds, 2),
           prefix_cache_hit_rate=round(hit, 4), gated_first_turns=int(gated), **stats)


# -- seeds whatever shares the batch ----------------------------------------------------------------

def first_difference(a, b) -> int | None:
    """The first index where two token sequences differ (None when equal)."""
    if tuple(a) == tuple(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def seeds(args, engine) -> None:
    """One seeded request (T=1, no truncation) alone, again, and beside a greedy, sampled or top-p
    request that starts with it and runs longer (so it shares every prefill and decode step).

    SGLang 0.5.17 draws seeded noise by token id in a batch where no row truncates and by rank in
    any other (a greedy row is top_k=1 there); the backend sends untruncated rows through the
    sorted sampler always (protocol.WHOLE_VOCAB_SORTED), so all cases must give the same tokens.
    The control sends the same request with SGLang's own "no top-k" (-1) beside a greedy one: it
    is expected to differ from the same request alone, which confirms where the dependence came from.
    """
    import uuid

    from agentrl.rollout.backends.sglang import protocol as P
    from agentrl.rollout.engine import SamplingParams

    rng = torch.Generator().manual_seed(7)
    p, q, r = (torch.randint(3, 400, (n,), generator=rng).tolist() for n in (60, 80, 100))
    mine = SamplingParams(temperature=1.0, max_tokens=32, seed=11)
    long = dict(max_tokens=160)
    neighbours = {"alone_again": [], "greedy_neighbour": [(q, SamplingParams(temperature=0.0, **long))],
                  "sampled_neighbours": [(q, SamplingParams(seed=3, **long)), (r, SamplingParams(seed=4, **long))],
                  "top_p_neighbour": [(q, SamplingParams(top_p=0.9, seed=5, **long))]}

    def batch(pairs):
        engine.reset_prefix_cache()  # every case prefills from scratch: only the neighbours differ
        async def go():
            return await asyncio.gather(*(engine.generate(x, sp) for x, sp in pairs))
        return asyncio.run(go())

    alone = batch([(p, mine)])[0]
    results, worst = {}, 0.0
    for name, others in neighbours.items():
        got = batch([*others, (p, mine)])[-1]
        results[name] = first_difference(alone.token_ids, got.token_ids)
        if results[name] is None:
            worst = max(worst, max(abs(x - y) for x, y in zip(alone.logprobs, got.logprobs)))
        else:
            print(f"  {name}: alone {list(alone.token_ids)}\n  {name}: here  {list(got.token_ids)}", flush=True)

    def raw(prompt, params):  # the request as sent, with SGLang's own top_k (bypassing the backend's choice)
        async def go():
            progress = P.Progress([], [])
            async for out in engine._transport.stream(P.generate_request(prompt, params, uuid.uuid4().hex)):
                progress.add(P.parse_chunk(out))
            return progress.token_ids
        return asyncio.wrap_future(engine._transport.loop.submit(go()))

    def control():
        params = {**P.sampling_params(mine, max_new_tokens=32, sampling_seed=11, deterministic=True), "top_k": -1}
        engine.reset_prefix_cache()

        async def go():
            solo = await raw(p, params)
            engine.reset_prefix_cache()
            greedy_q = engine.generate(q, SamplingParams(temperature=0.0, **long))
            _, beside = await asyncio.gather(greedy_q, raw(p, params))
            return solo, beside
        return asyncio.run(go())

    solo, beside = control()
    ok = all(v is None for v in results.values()) and worst < 1e-4  # deterministic mode promises bitwise
    report("seeds", ok, **{f"{k}_first_difference": v for k, v in results.items()},
           max_logprob_diff_where_equal=worst,
           control_top_k_minus_1_beside_greedy_first_difference=first_difference(solo, beside))


# -- weight update ----------------------------------------------------------------------------------

def perturb(hf, seed: int, scale: float, relative: bool = True) -> dict[str, torch.Tensor]:
    """Add noise to every weight in place: `scale` itself (relative=False), or a norm-keeping mix
    (relative=True): w <- (w + scale * std(w) * noise) / sqrt(1 + scale^2) for every tensor with a
    spread (norm weights and zero biases are left alone), so each tensor keeps its std and the model
    its logit scale. Adding 3 std without the division (the first GPU run) tripled every matrix:
    sharper attention and larger activations, where bf16 rounding (in HF as in the engine) moves
    logprobs by 0.16 on average (also seen with vLLM), against 0.008 on the model as built."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in hf.parameters():
            if not relative:
                w.add_(torch.randn_like(w) * scale)
                continue
            std = w.float().std().item() if w.numel() > 1 else 0.0
            if std > 0:
                w.add_(torch.randn_like(w) * (scale * std)).div_((1 + scale**2) ** 0.5)
    return hf.state_dict()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def margin_at(hf, prompt: list[int], tokens: list[int], i: int) -> float:
    """HF's gap between its two best logits at response step i (a near-tie explains a parted path)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens[:i]], device=hf.device)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def update(args, engine, hf) -> None:
    """Greedy outputs before and after `update_weights`; each time the engine's logprobs against HF
    bf16 on the weights it should have, and after the update also HF bf16 against HF float32 on the
    new weights (bf16's own noise floor there)."""
    from agentrl.rollout.engine import SamplingParams

    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 400, (n,), generator=rng).tolist() for n in (40, 90, 150, 220)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    def gen(ps):
        async def go():
            return await asyncio.gather(*(engine.generate(p, greedy) for p in ps))
        return asyncio.run(go())

    def against_hf(outs):
        diffs, agree, margins = [], [], []
        for p, out in zip(prompts, outs):
            ref = recompute(hf, p + list(out.token_ids), 1.0)[len(p) - 1:]  # [24]
            diffs.append((torch.tensor(out.logprobs) - ref.cpu()).abs())
            ids = hf_greedy(hf, p, 24)
            i = first_difference(ids, out.token_ids)
            agree.append(24 if i is None else i)
            margins.append(None if i is None else round(margin_at(hf, p, ids, i), 4))
        return diffs_stats(torch.cat(diffs)), agree, margins

    before = gen(prompts)
    before_stats, before_agree, _ = against_hf(before)
    warm = gen(prompts[:1])[0]  # served from the radix cache now
    t0 = time.perf_counter()
    engine.update_weights(perturb(hf, 5, 3.0), version=1)  # 90% new noise, the same std per tensor
    seconds = time.perf_counter() - t0
    after = gen(prompts)
    # A model whose tied embedding dominates (the dry run's tiny one; maybe a random 0.5B one) keeps
    # repeating the prompt's last token under any std-keeping change: then the logprobs of the same
    # tokens tell that the engine runs new weights (its own run-to-run noise is 0: deterministic mode).
    tokens_changed = sum(a.token_ids != b.token_ids for a, b in zip(after, before))
    changed = sum(a.token_ids != b.token_ids or max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) > 0.05
                  for a, b in zip(after, before))
    stats, agree, margins = against_hf(after)
    hf32 = copy.deepcopy(hf).float()
    floor = torch.cat([(recompute(hf, p + list(o.token_ids), 1.0) - recompute(hf32, p + list(o.token_ids), 1.0))
                       [len(p) - 1:].abs().cpu() for p, o in zip(prompts, after)])
    del hf32
    versions = {o.weight_version for o in after}
    cache_before_update = warm.prompt_cached_tokens
    flushed = after[0].prompt_cached_tokens
    ok = (changed >= 1 and versions == {1} and stats["mean_abs_diff"] < 0.05 and stats["max_abs_diff"] < 1.0
          and flushed == 0 and cache_before_update > 0)
    report("update", ok, outputs_changed=f"{changed}/{len(prompts)}", tokens_changed=f"{tokens_changed}/{len(prompts)}",
           weight_versions=sorted(versions),
           update_seconds=round(seconds, 2), cached_before_update=cache_before_update, cached_after_update=flushed,
           greedy_prefix_agreeing_with_hf=agree, hf_top2_margin_where_parted=margins,
           before_mean_abs_diff=before_stats["mean_abs_diff"], before_max_abs_diff=before_stats["max_abs_diff"],
           before_greedy_prefix_agreeing_with_hf=before_agree,
           hf_bf16_vs_f32_mean_abs_diff=float(floor.mean()), hf_bf16_vs_f32_max_abs_diff=float(floor.max()), **stats)


# -- server mode --------------------------------------------------------------------------------------

def server(args) -> None:
    from transformers import AutoModelForCausalLM

    from agentrl.rollout.backends.managed import ServerSpec
    from agentrl.rollout.backends.sglang import SGLangEngine
    from agentrl.rollout.engine import SamplingParams

    tiny = os.path.abspath(args.tiny)
    log_dir = os.path.join(args.work, "servers")
    if args.cpu_dry_run:
        sys.path.insert(0, os.path.join(REPO, "tests", "rollout"))
        from sglang_protocol import server_env

        spec = ServerSpec(launch=True, env=server_env(), log_dir=log_dir)
        dtype, device, options = torch.float32, "cpu", {}
    else:
        spec = ServerSpec(launch=True, log_dir=log_dir)  # the server inherits PYTHONPATH (sglang in /tmp/site)
        dtype, device = torch.bfloat16, "cuda"
        options = {"attention_backend": "triton", "mem_fraction_static": 0.1}  # the tiny model's heads of 16: no fa3
    prompt = list(range(20, 80))
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    t0 = time.perf_counter()
    engine = SGLangEngine(tiny, device=device, dtype=dtype, server=spec, max_model_len=1024, **options)
    started = time.perf_counter() - t0
    try:
        base = asyncio.run(engine.generate(prompt, greedy))

        async def abort_one():
            task = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=900)))
            while engine.stats.generated_tokens < base_tokens + 2:
                await asyncio.sleep(0.01)
            engine.abort()
            return await asyncio.wait_for(task, 60)

        base_tokens = engine.stats.generated_tokens
        aborted = asyncio.run(abort_one())
        new = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        sd = perturb(new, 9, 0.5, relative=False)  # as the conformance suite's update test
        engine.update_weights(sd, version=2)
        updated = asyncio.run(engine.generate(prompt, greedy))
        os.killpg(engine._server.pid, signal.SIGKILL)
        t1 = time.perf_counter()
        resynced = asyncio.run(engine.generate(prompt, greedy))
        restart_s = time.perf_counter() - t1
        ok = (aborted.finish_reason == "abort" and updated.token_ids != base.token_ids
              and resynced.token_ids == updated.token_ids and resynced.weight_version == 2
              and engine._server.restarts == 1)
        report("server", ok, start_seconds=round(started, 1), aborted=aborted.finish_reason,
               aborted_tokens=len(aborted.token_ids), update_changed_output=updated.token_ids != base.token_ids,
               restarts=engine._server.restarts, restart_and_resync_seconds=round(restart_s, 1),
               resynced_equal=resynced.token_ids == updated.token_ids, log=os.path.join(log_dir, "sglang.log"))
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="conformance,episodes,seeds,update,server")
    ap.add_argument("--tiny", default="models/tiny-conf", help="the tiny conformance model built on the CPU machine")
    ap.add_argument("--work", default="/tmp/sglang-proof")
    ap.add_argument("--bf16-tol", type=float, default=0.05)
    ap.add_argument("--json", help="write the PASS/FAIL records here")
    ap.add_argument("--cpu-dry-run", action="store_true", help="check this script on CPU against the stand-in")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    if not args.cpu_dry_run:
        import sglang

        print(f"sglang {sglang.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    if "conformance" in parts:
        conformance(args)
    if "episodes" in parts or "seeds" in parts or "update" in parts:
        model_dir = os.path.abspath(args.tiny) if args.cpu_dry_run else qwen2_05b(args.work, args.tiny)
        t1 = time.perf_counter()
        engine = make_engine(args, model_dir, attention_backend="fa3")
        print(f"engine up in {time.perf_counter() - t1:.1f} s", flush=True)
        hf = hf_model(args, model_dir)
        try:
            if "episodes" in parts:
                episodes(args, engine, hf, model_dir)
            if "seeds" in parts:
                seeds(args, engine)
            if "update" in parts:
                update(args, engine, hf)
        finally:
            engine.close()
    if "server" in parts:
        server(args)
    print(f"total {time.perf_counter() - t0:.0f} s; " + ", ".join(f"{r['part']} {r['result']}" for r in RESULTS),
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=2)
    sys.exit(0 if all(r["result"] != "FAIL" for r in RESULTS) else 1)


if __name__ == "__main__":
    main()
