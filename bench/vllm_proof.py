"""The vllm backend on the real vLLM 0.24, on a GPU: the checks behind docs/backends.md's vLLM section.

Run by bench/vllm_gpu_proof.sh on the device (after the conformance suite); every check prints one
`PASS`/`FAIL` line with its numbers and the script exits non-zero if any failed.

- `three_turn`: 32 episodes of exactly 3 model turns (an env that answers every turn with a user
  message and ends after the third) through agentrl's agent loop on the vllm engine, in bf16, on a
  random model of the Qwen2-0.5B shape; every sampled token's rollout logprob against the trainer's
  recomputation (one HF forward of the whole episode, bf16 weights, `log_softmax` in float32).
  A random model almost never samples the end-of-turn token, so its head row is set to make that
  token likely (p ~ 0.2 a step), through one embedding dimension held constant: turns end with
  `stop` after a few tokens, as a trained model's do.
- `update`: greedy outputs before and after `update_weights` with other weights; after the update
  they must agree with HF on the new weights (and no longer with the old ones). Then the colocated
  cycle: `sleep()`, `update_weights` while asleep, `wake()`; and `update_weights_from_disk`.
- `server`: the same engine class against a `vllm serve` it launches (the HTTP client, for real):
  greedy against HF, sampled logprobs against the recomputation, a stop string, `abort` with
  partial output, `update_weights`, `sleep`/`wake`.

CPU side, before going to the device: `python bench/vllm_proof.py --build-models models` writes
`models/tiny-conf` (the conformance suite's tiny model, same recipe as tests/conftest.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentrl.envs.core import Env, Message  # noqa: E402
from agentrl.rollout.engine import SamplingParams  # noqa: E402

RESULTS: list[dict] = []
BF16 = dict(mean=0.02, p99=0.1, max=0.3)  # |rollout - recomputed| logprob, nats, for bf16 weights on both sides


def report(name: str, ok: bool, **numbers) -> bool:
    RESULTS.append({"check": name, "pass": bool(ok), **numbers})
    text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)
    return ok


def diff_stats(d: torch.Tensor) -> dict:
    d = d.abs().float()
    return dict(n=int(d.numel()), mean=float(d.mean()), median=float(d.median()),
                p99=float(d.quantile(0.99)), max=float(d.max()))


# -- models -------------------------------------------------------------------------------------------
def build_models(out: str) -> None:
    """CPU: the conformance suite's tiny model (tests/conftest.py's recipe) under `out`/tiny-conf."""
    from agentrl.recipes.tiny_model import TinyModelShape, build_tiny_model

    torch.manual_seed(0)
    shape = TinyModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    build_tiny_model(os.path.join(out, "tiny-conf"), "calculator-v0", shape=shape, demos=64, sft_steps=3,
                     batch_seqs=8, seed=0)


QWEN2_HALF_B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096)


def qwen2_half_b(out: str, tokenizer_dir: str, eot: int, seed: int = 0, p_eot: float = 0.2,
                 shape: dict = QWEN2_HALF_B, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A random Qwen2-0.5B-shaped model (bf16) whose end-of-turn token has probability ~p_eot; saved to `out`."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, tie_word_embeddings=False, eos_token_id=eot, pad_token_id=0, bos_token_id=None)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    boost_end_of_turn(model, eot, p_eot)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return model


def boost_end_of_turn(model, eot: int, p_eot: float) -> None:
    """Make `eot` likely (~p_eot a step) at every position, in a way bf16 rounding cannot swing.

    Residual dimension 0 is a constant channel: every embedding has 1 there and no layer writes to
    it (row 0 of each o_proj and down_proj is zero), so after the final norm h[0] = 1 / rms(h) is
    positive and nearly constant (its spread over positions is ~2%). The head row of `eot` reads
    only h[0], scaled so its logit sits log(p / (1 - p)) above the log-sum-exp of the others.
    (The first version let the layers write into dimension 0: h[0] then changed sign between
    positions, the scale came out near -190, and a bf16 rounding of h[0] moved the end-of-turn
    logit by tens of nats: the first GPU run's 37-nat outliers.)
    """
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[eot] = 0.0
        device = model.lm_head.weight.device
        ids = torch.randint(3, 400, (4, 96), generator=torch.Generator().manual_seed(0)).to(device)
        h = model.model(ids).last_hidden_state.float()  # [4, 96, hidden], after the final norm
        logits = model.lm_head(h.to(model.lm_head.weight.dtype)).float()
        logits[..., eot] = -math.inf
        level = torch.logsumexp(logits, -1).mean() + math.log(p_eot / (1 - p_eot))
        model.lm_head.weight[eot, 0] = level / h[..., 0].mean()


def perturbed(model, seed: int, scale: float, eot: int, p_eot: float = 0.2):
    """A copy of `model` with noise of `scale` times each weight's own std added (on the model's device),
    then the end-of-turn construction re-imposed: another model of the same kind, whose logits are in
    the same range as the original's (so bf16 rounding moves them as little)."""
    import copy

    new = copy.deepcopy(model)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for w in new.parameters():
            w.add_(torch.randn(w.shape, generator=gen, device=device, dtype=w.dtype) * w.float().std() * scale)
    boost_end_of_turn(new, eot, p_eot)
    return new


def recompute(hf, ids: list[int]) -> torch.Tensor:
    """Trainer-style logprobs of every token given its prefix: one forward, log_softmax in float32. [T-1]."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids], device="cuda")).logits[0, :-1].float()  # [T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device="cuda").unsqueeze(-1)).squeeze(-1)


# -- (iii) 3-turn episodes --------------------------------------------------------------------------
class ThreeTurns(Env):
    """Every model turn is answered with a user message; the episode ends after the third turn."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return (Message("user", f"Task {seed}: count with me."),), {"task_id": str(seed), "split": "train"}

    def step(self, action: str):
        self.turn += 1
        done = self.turn >= 3
        return (() if done else (Message("user", f"Turn {self.turn} done. Go on."),)), 0.0, done, False, {}


def turn_tokens(traj, ref: torch.Tensor, eot: int) -> list[dict]:
    """One row per sampled token of `traj`: where it is (turn, index in the turn), what it is, both logprobs.

    `ref` is `recompute` of the whole episode ([T-1], entry i is token i + 1's logprob).
    """
    return [dict(turn=turn, k=i - start, pos=i, token=int(traj.token_ids[i]), eot=int(traj.token_ids[i]) == eot,
                 rollout=float(traj.rollout_logprobs[i]), ref=float(ref[i - 1]), version=int(traj.weight_versions[i]))
            for turn, (start, end) in enumerate(traj.turn_spans) for i in range(max(start, 1), end)]


def print_worst(rows: list[dict], n: int = 8) -> None:
    """The `n` rows with the largest |rollout - ref|, one line each."""
    for r in sorted(rows, key=lambda r: -abs(r["rollout"] - r["ref"]))[:n]:
        print("   ", "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              f"diff={abs(r['rollout'] - r['ref']):.4g}", flush=True)


def check_three_turns(engine, hf, tokenizer) -> None:
    from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
    from agentrl.rollout.chat import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    specs = [EpisodeSpec(seed=i) for i in range(32)]
    t0 = time.perf_counter()
    trajs = asyncio.run(run_episodes(engine, EnvPool(ThreeTurns), renderer,
                                     SamplingParams(temperature=1.0, max_tokens=64, seed=7),
                                     EpisodeLimits(max_turns=3, max_total_tokens=2048), specs))
    seconds = time.perf_counter() - t0
    failed = [t.error for t in trajs if t.failure is not None]
    turns = [t.num_turns for t in trajs]
    rows = []
    for e, t in enumerate(trajs):
        rows += [dict(episode=e, **r) for r in turn_tokens(t, recompute(hf, list(t.token_ids)), renderer.end_of_turn_id)]
    s = diff_stats(torch.tensor([r["rollout"] - r["ref"] for r in rows]))
    hit = engine.stats.extra.get("prefix_cache_hit_rate", 0.0)
    ok = (not failed and all(n == 3 for n in turns) and s["mean"] < BF16["mean"] and s["p99"] < BF16["p99"]
          and s["max"] < BF16["max"])
    # Where the differences sit: first token of a turn, end-of-turn tokens, the rest; turns 2-3 (prefix hits).
    parts = {"first_of_turn": [r for r in rows if r["k"] == 0], "end_of_turn": [r for r in rows if r["eot"]],
             "other": [r for r in rows if r["k"] > 0 and not r["eot"]], "later_turns": [r for r in rows if r["turn"] > 0]}
    detail = {f"{name}_max": max((abs(r["rollout"] - r["ref"]) for r in rs), default=0.0) for name, rs in parts.items()}
    report("three_turn_logprobs_vs_trainer", ok, episodes=len(trajs), three_turn_episodes=turns.count(3),
           failed=len(failed), sampled_tokens=s["n"], mean_abs=s["mean"], median_abs=s["median"], p99_abs=s["p99"],
           max_abs=s["max"], **detail, end_of_turn_share=len(parts["end_of_turn"]) / max(1, len(rows)),
           prefix_cache_hit_rate=hit, seconds=seconds)
    if failed:
        print("first failure:", failed[0], flush=True)
    if not ok:
        print_worst(rows)


# -- (iv) weight updates ------------------------------------------------------------------------------
PROMPTS = [[5 + i, 17, 23 + 2 * i, 9, 41, 3 + i, 77, 12] * 4 for i in range(4)]


def greedy(engine, prompts=PROMPTS, n: int = 16):
    return sample(engine, prompts, n, temperature=0.0)


def sample(engine, prompts=PROMPTS, n: int = 16, temperature: float = 1.0):
    """One response per prompt, seeded (seed i for prompt i), no stop token."""
    async def go():
        return await asyncio.gather(*(engine.generate(p, SamplingParams(temperature=temperature, max_tokens=n, seed=i))
                                      for i, p in enumerate(prompts)))
    return asyncio.run(go())


def token_rows(hf, outs, prompts=PROMPTS) -> list[dict]:
    """Per engine token: prompt index, position, token, the engine's logprob, HF's (T = 1), HF's argmax."""
    rows = []
    for j, (p, g) in enumerate(zip(prompts, outs)):
        ids = list(p) + list(g.token_ids)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids], device="cuda")).logits[0, len(p) - 1:-1].float(), -1)
        for k, tok in enumerate(g.token_ids):
            rows.append(dict(prompt=j, k=k, token=int(tok), rollout=float(g.logprobs[k]), ref=float(lp[k, tok]),
                             hf_argmax=int(lp[k].argmax()), version=g.weight_version, finish=g.finish_reason))
    return rows


def agreement(hf, outs, prompts=PROMPTS) -> tuple[float, float]:
    """(mean |engine - HF| logprob over the engine's tokens, share of them that are HF's argmax), T = 1."""
    rows = token_rows(hf, outs, prompts)
    return (sum(abs(r["rollout"] - r["ref"]) for r in rows) / len(rows),
            sum(r["token"] == r["hf_argmax"] for r in rows) / len(rows))


def report_update(name: str, ok: bool, rows: list[dict], **numbers) -> None:
    """`report` plus, on failure, the tokens where the engine and HF part most."""
    report(name, ok, max_abs=max(abs(r["rollout"] - r["ref"]) for r in rows), **numbers)
    if not ok:
        print_worst(rows)


def check_updates(engine, hf_old, model_dir: str, eot: int) -> None:
    """Seeded sampling at T = 1 (greedy would pick the boosted end-of-turn token every step on this model)."""
    before = sample(engine)
    d_old, _ = agreement(hf_old, before)
    new = perturbed(hf_old, seed=1, scale=1.0, eot=eot)
    t0 = time.perf_counter()
    engine.update_weights(new.state_dict(), version=1)
    seconds = time.perf_counter() - t0
    after = sample(engine)
    rows = token_rows(new, after)
    d_new = sum(abs(r["rollout"] - r["ref"]) for r in rows) / len(rows)
    d_stale, _ = agreement(hf_old, after)
    changed = sum(a.token_ids != b.token_ids for a, b in zip(after, before))
    report_update("update_weights_changes_outputs", changed == len(PROMPTS) and d_old < BF16["mean"]
                  and d_new < BF16["mean"] and d_stale > 10 * d_new and all(g.weight_version == 1 for g in after),
                  rows, prompts_changed=changed, before_vs_old_mean_abs=d_old, after_vs_new_mean_abs=d_new,
                  after_vs_old_mean_abs=d_stale, versions=sorted({g.weight_version for g in after}),
                  update_seconds=seconds)

    newer = perturbed(hf_old, seed=2, scale=1.0, eot=eot)
    engine.sleep()
    engine.update_weights(newer.state_dict(), version=2)
    engine.wake()
    woke = sample(engine)
    rows = token_rows(newer, woke)
    d_woke = sum(abs(r["rollout"] - r["ref"]) for r in rows) / len(rows)
    d_woke_stale, _ = agreement(new, woke)
    report_update("sleep_update_wake", d_woke < BF16["mean"] and d_woke_stale > 10 * d_woke
                  and all(g.weight_version == 2 for g in woke), rows, after_vs_new_mean_abs=d_woke,
                  after_vs_previous_mean_abs=d_woke_stale, versions=sorted({g.weight_version for g in woke}))

    engine.update_weights_from_disk(model_dir, version=3)  # back to the weights saved with the model
    back = sample(engine)
    rows = token_rows(hf_old, back)
    d_back = sum(abs(r["rollout"] - r["ref"]) for r in rows) / len(rows)
    d_back_stale, _ = agreement(newer, back)
    report_update("update_weights_from_disk", d_back < BF16["mean"] and d_back_stale > 10 * d_back
                  and all(g.weight_version == 3 for g in back), rows, after_vs_saved_mean_abs=d_back,
                  after_vs_previous_mean_abs=d_back_stale,
                  same_tokens_as_first_run=sum(a.token_ids == b.token_ids for a, b in zip(back, before)))


# -- (v) the HTTP client against a real vLLM server ---------------------------------------------------------
def check_server(tiny_dir: str, log_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentrl.rollout.backends.managed import ServerSpec
    from agentrl.rollout.backends.vllm import VLLMEngine

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to("cuda").eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    t0 = time.perf_counter()
    engine = VLLMEngine(tiny_dir, dtype=torch.float32, max_model_len=1024, enforce_eager=True,
                        gpu_memory_utilization=0.15, server=ServerSpec(launch=True, log_dir=log_dir))
    started = time.perf_counter() - t0
    try:
        prompts = [tok.encode(t) for t in ("What is 12 times 13 plus 5?", "A shop has 40 boxes of 12 pens.")]
        outs = greedy(engine, prompts, 24)
        d, agree = agreement(hf, outs, prompts)
        report("server_greedy_vs_hf", d < 2e-3 and agree > 0.95, start_seconds=started, mean_abs=d, argmax_agree=agree)

        async def sampled():
            return await asyncio.gather(*(engine.generate(p, SamplingParams(temperature=0.7, max_tokens=32, seed=i))
                                          for i, p in enumerate(prompts)))
        diffs = []
        for p, g in zip(prompts, asyncio.run(sampled())):
            ids = list(p) + list(g.token_ids)
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([ids], device="cuda")).logits[0, len(p) - 1:-1].float() / 0.7, -1)
            diffs.append(lp.gather(-1, torch.tensor(g.token_ids, device="cuda").unsqueeze(-1)).squeeze(-1)
                         - torch.tensor(g.logprobs, device="cuda"))
        s = diff_stats(torch.cat(diffs))
        report("server_sampled_logprobs_T0.7", s["max"] < 2e-3, **s)

        full = greedy(engine, prompts[:1], 16)[0].token_ids
        stop = tok.decode(list(full[5:7]))
        cut = asyncio.run(engine.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=16, stop=(stop,))))
        end = next(k for k in range(1, 17) if stop in tok.decode(list(full[:k])))
        report("server_stop_string", cut.token_ids == full[:end] and cut.finish_reason == "stop",
               tokens=len(cut.token_ids), expected=end)

        async def aborted():
            # Wait for this request's own tokens: the engine's counter already holds the earlier checks' tokens
            # (the first run waited on a threshold they had passed, so abort() came before this request
            # existed, and abort() ends only the requests already in flight).
            base = engine.stats.generated_tokens
            task = asyncio.ensure_future(engine.generate([5, 6, 7, 8], SamplingParams(max_tokens=1000)))
            deadline = time.perf_counter() + 30
            while engine.stats.generated_tokens < base + 20 and not task.done() and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            seen = engine.stats.generated_tokens - base
            t_abort = time.perf_counter()
            await asyncio.to_thread(engine.abort)
            out = await asyncio.wait_for(task, 60)
            return out, seen, time.perf_counter() - t_abort
        part, seen, latency = asyncio.run(aborted())
        report("server_abort_partial", part.finish_reason == "abort" and seen <= len(part.token_ids) < 1000
               and len(part.logprobs) == len(part.token_ids), tokens=len(part.token_ids), tokens_seen_at_abort=seen,
               finish_reason=part.finish_reason, seconds_abort_to_return=latency)
        after_abort = greedy(engine, prompts[:1], 4)[0]  # the server serves on after the abort
        report("server_after_abort", after_abort.finish_reason == "length" and len(after_abort.token_ids) == 4,
               tokens=len(after_abort.token_ids), finish_reason=after_abort.finish_reason)

        new = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to("cuda").eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for w in new.parameters():
                w.add_(torch.randn_like(w) * 0.5)
        engine.update_weights(new.state_dict(), version=7)
        upd = greedy(engine, prompts, 12)
        d_new, agree_new = agreement(new, upd, prompts)
        report("server_update_weights", d_new < 2e-3 and agree_new > 0.95 and upd[0].weight_version == 7
               and upd[0].prompt_cached_tokens == 0, mean_abs=d_new, argmax_agree=agree_new)

        engine.sleep()
        engine.wake()
        again = greedy(engine, prompts, 12)
        report("server_sleep_wake", [g.token_ids for g in again] == [g.token_ids for g in upd])
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-models", metavar="DIR", help="CPU: write DIR/tiny-conf and stop")
    ap.add_argument("--tiny", default="models/tiny-conf", help="the conformance tiny model (tokenizer source)")
    ap.add_argument("--work", default="/tmp/vllm-proof", help="where the random 0.5B model is written")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.build_models:
        build_models(args.build_models)
        return
    from transformers import AutoTokenizer

    from agentrl.rollout.backends.vllm import VLLMEngine
    from agentrl.rollout.chat import ChatRenderer

    args.tiny = os.path.abspath(args.tiny)  # the launched server runs it too
    tokenizer = AutoTokenizer.from_pretrained(args.tiny)
    eot = ChatRenderer(tokenizer).end_of_turn_id
    model_dir = os.path.join(args.work, "qwen2-0.5b-random")
    shutil.rmtree(model_dir, ignore_errors=True)
    t0 = time.perf_counter()
    hf = qwen2_half_b(model_dir, args.tiny, eot)
    engine = VLLMEngine(model_dir, dtype=torch.bfloat16, max_model_len=2048, enforce_eager=True,
                        gpu_memory_utilization=0.3)
    print(f"vLLM engine on the 0.5B model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        check_three_turns(engine, hf, tokenizer)
        check_updates(engine, hf, model_dir, eot)
    finally:
        engine.close()
    del hf
    torch.cuda.empty_cache()
    if not args.skip_server:
        try:
            check_server(args.tiny, os.path.join(args.work, "logs"))
        except Exception as exc:  # a server that does not start (a missing package, say) is a result too
            report("server", False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=2)
    failed = [r["check"] for r in RESULTS if not r["pass"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
