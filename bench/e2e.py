"""End-to-end rollout benchmarks of the agent loop (one command, ratios from one run).

Workload `turns`: multi-turn episodes on a tool-like env whose every step takes a random 0-200 ms
(a sandbox run, a web fetch), the same seeded episodes played two ways on one engine:

- turn-synchronous batching (`lockstep=True`): every live episode submits its next turn together,
  so each turn waits for the slowest tool call of the batch;
- per-episode asynchronous turns (`lockstep=False`, agentrl's default on GPUs): each episode sends
  its next turn as soon as its own observation is back, and the engine batches whatever is ready.

Both play exactly the same tokens (seeded requests sample the same whatever the batch), so the
ratio of wall times is the gain of asynchronous turns. Turn lengths come from the model: a turn
ends on one of a fixed set of token ids (about 1 in 24 of the vocabulary), so a random model ends
its turns after ~24 tokens, as a trained one ends them with its end-of-turn token.

Workload `train` (GPUs; bench/e2e_train.py): whole `agentrl train` steps of one GRPO job in
several layouts: synchronous on one GPU (plain, compiled, colocated with the engine asleep during
the update), and on two GPUs the engine on its own GPU, synchronous or asynchronous (bounded
staleness 1); tokens/s per GPU, the time split per role, the weight-sync time and the staleness
histogram of each, with ratios in one run.

Example:
    PYTHONPATH=. python bench/e2e.py --random tiny --tokenizer models/tiny-calculator            # CPU
    PYTHONPATH=. python bench/e2e.py --random qwen2-0.5b --tokenizer models/tiny-calculator --device cuda
    PYTHONPATH=. python bench/e2e.py --workload train --tokenizer models/tiny-calculator --json train.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

from agentrl.envs.core import Env, Message
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import SamplingParams


class LatencyEnv(Env):
    """Every step waits a random 0..`max_latency_s` (seeded per episode and turn), then answers with
    a short observation; the episode ends after `turns` model turns."""

    splits = ("train",)

    def __init__(self, turns: int = 4, max_latency_s: float = 0.2, obs_words: int = 12):
        self.turns, self.max_latency_s, self.obs_words = turns, max_latency_s, obs_words
        self._seed, self._turn = 0, 0

    def reset(self, *, seed=None, options=None):
        self._seed, self._turn = int(seed or 0), 0
        return (Message("user", f"Task {self._seed}: keep going."),), {"task_id": str(self._seed)}

    def step(self, action):
        raise NotImplementedError("LatencyEnv is asynchronous; use astep")

    async def areset(self, *, seed=None, options=None):
        return self.reset(seed=seed, options=options)

    async def astep(self, action):
        rng = random.Random(self._seed * 1009 + self._turn)
        self._turn += 1
        await asyncio.sleep(rng.uniform(0.0, self.max_latency_s))
        done = self._turn >= self.turns
        obs = () if done else (Message("tool", " ".join(f"r{rng.randrange(100)}" for _ in range(self.obs_words)),
                                       name="work"),)
        return obs, float(done), done, False, {}


def build(args):
    """The tokenizer of --tokenizer (or --model) and an engine over --model or a random model."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.random is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        from agentrl.recipes.tiny_model import TinyModelShape

        t = TinyModelShape()
        shape = (dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936) if args.random == "qwen2-0.5b" else
                 dict(hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                      num_key_value_heads=t.num_kv_heads, intermediate_size=t.intermediate_size, vocab_size=len(tok)))
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, max_position_embeddings=4096,
                                                                       tie_word_embeddings=True))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    engine = EmbeddedEngine(model.to(dtype), device=args.device, dtype=dtype, max_model_len=4096, tokenizer=tok)
    return tok, engine


def play(engine, renderer, args, lockstep: bool, stops: tuple[int, ...]) -> tuple[float, int]:
    pool = EnvPool(lambda: LatencyEnv(turns=args.turns, max_latency_s=args.max_latency_ms / 1000))
    sampling = SamplingParams(temperature=1.0, max_tokens=args.turn_tokens, seed=1234, stop_token_ids=stops)
    specs = [EpisodeSpec(seed=i, group_id=i) for i in range(args.episodes)]
    limits = EpisodeLimits(max_turns=args.turns, max_total_tokens=4000)
    t0 = time.perf_counter()
    trajs = asyncio.run(run_episodes(engine, pool, renderer, sampling, limits, specs, lockstep=lockstep))
    return time.perf_counter() - t0, sum(t.num_model_tokens for t in trajs)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local HF model directory (its tokenizer is used too)")
    ap.add_argument("--tokenizer", help="tokenizer directory (with --random)")
    ap.add_argument("--random", choices=["tiny", "qwen2-0.5b"], help="random weights of this shape instead of --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=64, help="most tokens per turn")
    ap.add_argument("--max-latency-ms", type=float, default=200.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--workload", choices=["turns", "train"], default="turns")
    ap.add_argument("--baseline-src", help="train: also run the plain variant from this source tree (a baseline)")
    ap.add_argument("--work-dir", default="bench_runs", help="train: model and run directories go here")
    ap.add_argument("--steps", type=int, default=7, help="train: steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="train: first steps left out of the means")
    ap.add_argument("--only", help="train: comma-separated variant names to run")
    args = ap.parse_args(argv)
    if args.workload == "train":
        return train_workload(args)
    if not (args.model or (args.random and args.tokenizer)):
        ap.error("give --model, or --random SHAPE with --tokenizer")
    tok, engine = build(args)
    renderer = ChatRenderer(tok)
    vocab = engine.model.config.vocab_size
    stops = tuple(range(3, vocab, 24)) + (renderer.end_of_turn_id,)
    play(engine, renderer, argparse.Namespace(**{**vars(args), "episodes": min(args.episodes, 4)}), False, stops)  # warm-up
    rows = []
    default_wait = engine.admit_wait_steps
    modes = [("turn-synchronous", True, default_wait), ("per-episode async", False, default_wait)]
    if default_wait:  # the same with every request admitted at once (each trickling turn its own eager step)
        modes.append(("per-episode async, admit at once", False, 0))
    for mode, lockstep, wait in modes:
        engine.admit_wait_steps = engine._sched.admit_wait_steps = wait  # the knob of the engine's scheduler
        before = dict(engine._steps.counts)  # engine step counters (all repeats of this mode)
        best = min((play(engine, renderer, args, lockstep, stops) for _ in range(args.repeats)), key=lambda r: r[0])
        steps = {k: (v - before[k]) // args.repeats for k, v in engine._steps.counts.items()}
        rows.append({"workload": "turns", "mode": mode, "admit_wait_steps": wait, "seconds": round(best[0], 3),
                     "tokens": best[1], "tok_per_s": round(best[1] / best[0], 1),
                     "engine_steps": steps["steps"], "graph_steps": steps["graph_steps"]})
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = round(base / r["seconds"], 2)
        print(f"{r['workload']:6s} {r['mode']:34s} {r['tokens']:7d} tok {r['seconds']:8.2f} s "
              f"{r['tok_per_s']:10.1f} tok/s {r['speedup']:5.2f}x  steps {r['engine_steps']} (graph {r['graph_steps']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def train_workload(args) -> list[dict]:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e_train

    if not args.tokenizer:
        raise SystemExit("--workload train needs --tokenizer (a directory with tokenizer files)")
    args.work_dir = os.path.abspath(args.work_dir)
    args.tokenizer = os.path.abspath(args.tokenizer)
    if args.baseline_src:
        args.baseline_src = os.path.abspath(args.baseline_src)
    rows = e2e_train.run_all(args)
    e2e_train.report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
