"""The training loop: collect episodes, score them, update the policy, hand the weights back.

This is the algorithm in one place; each stage is a named call:

    for step in range(steps):
        trajectories = collect(step)                      # engine + envs, many episodes at once
        advantages   = outcome_advantages(trajectories)   # group-normalised (GRPO by default)
        metrics      = policy_update(trajectories, advantages)
        engine.update_weights(policy.state_dict())        # rollouts of the next step use the new policy
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from agentrl.config import Config
from agentrl.envs.registration import make
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import SamplingParams
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.metrics import MetricsWriter, rollout_metrics
from agentrl.trainer.update import LossSettings, outcome_advantages, policy_update

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Session:
    """Everything a run holds: the policy being trained, the engine sampling from it, the envs."""

    cfg: Config
    tokenizer: object
    policy: torch.nn.Module
    engine: EmbeddedEngine
    pool: EnvPool
    renderer: ChatRenderer

    @classmethod
    def open(cls, cfg: Config, model_path: str | None = None) -> Session:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_path or cfg.model.path
        if not Path(path).is_dir():
            from agentrl.errors import ConfigError

            raise ConfigError(f"model.path {path!r} is not a directory; build one with `agentrl tiny-model --out {path}`")
        dtype = _DTYPES[cfg.model.dtype]
        tokenizer = AutoTokenizer.from_pretrained(path)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=register_varlen_attention())
        policy.to(cfg.model.device).eval()
        engine = EmbeddedEngine(path, device=cfg.model.device, dtype=dtype,
                                max_model_len=cfg.rollout.max_total_tokens + 1)
        pool = EnvPool(lambda: make(cfg.env.id, **cfg.env.kwargs))
        probe = pool.take()
        renderer = ChatRenderer(tokenizer, probe.tool_schemas())
        pool.give(probe)
        return cls(cfg, tokenizer, policy, engine, pool, renderer)

    def sampling(self, temperature: float, seed: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_tokens=r.max_tokens_per_turn, seed=seed)

    def limits(self) -> EpisodeLimits:
        return EpisodeLimits(max_turns=self.cfg.rollout.max_turns, max_total_tokens=self.cfg.rollout.max_total_tokens)

    def play(self, specs: list[EpisodeSpec], temperature: float):
        return asyncio.run(run_episodes(self.engine, self.pool, self.renderer, self.sampling(temperature),
                                        self.limits(), specs, env_id=self.cfg.env.id))


def evaluate(session: Session, split: str, num_tasks: int, temperature: float, seed: int) -> dict[str, float]:
    """Success rate on tasks 0..num_tasks-1 of a held-out split (one episode each)."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trajs = session.play([EpisodeSpec(seed=i, split=split, group_id=i) for i in range(num_tasks)], temperature)
    return rollout_metrics(trajs, time.perf_counter() - t0)


def task_seeds(step: int, prompts_per_step: int, seed: int) -> list[int]:
    """The data order: a fixed shuffled stream of training-task seeds, sliced by step."""
    rng = random.Random(seed * 7919 + step)
    return [rng.randrange(2**31 - 1) for _ in range(prompts_per_step)]


def train(cfg: Config, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, object]:
    """Run `cfg` end to end; returns {"before": ..., "after": ..., "history": [...]}."""
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    s = Session.open(cfg)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    ev = cfg.eval
    result: dict[str, object] = {"history": []}
    if ev.before and ev.num_tasks:
        result["before"] = evaluate(s, ev.split, ev.num_tasks, ev.temperature, ev.seed)
        writer.write({"event": "eval_before", **result["before"]})
    a, r = cfg.algorithm, cfg.rollout
    settings = LossSettings(a.policy_loss, a.agg_mode, a.clip_low, a.clip_high, a.entropy_coef,
                            temperature=r.temperature if r.temperature > 0 else 1.0, old_logprobs=a.old_logprobs)
    optimizer = torch.optim.AdamW(s.policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    adv_options = {"norm_by_std": a.norm_by_std} if a.advantage == "grpo" else {}
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        specs = [EpisodeSpec(seed=seed, split=cfg.env.train_split, group_id=g)
                 for g, seed in enumerate(task_seeds(step, r.prompts_per_step, cfg.train.seed))
                 for _ in range(r.samples_per_prompt)]
        trajectories = s.play(specs, r.temperature)
        t_rollout = time.perf_counter() - t0
        advantages = outcome_advantages(trajectories, a.advantage, **adv_options)
        metrics = rollout_metrics(trajectories, t_rollout)
        chunks = _mini_batches(len(trajectories), cfg.train.mini_batches, r.samples_per_prompt)
        for idx in chunks:
            upd = policy_update(s.policy, optimizer, [trajectories[i] for i in idx], [advantages[i] for i in idx],
                                settings, micro_batch_tokens=cfg.train.micro_batch_tokens,
                                grad_clip=cfg.optim.grad_clip, logprob_chunk=cfg.train.logprob_chunk)
            scheduler.step()
        metrics.update(upd)
        s.engine.update_weights(s.policy.state_dict(), version=step + 1)
        metrics.update(step=step + 1, rollout_s=t_rollout, step_s=time.perf_counter() - t0)
        writer.write(metrics)
        result["history"].append(metrics)
        if on_step:
            on_step(step + 1, metrics)
    final = run_dir / "final"
    s.policy.save_pretrained(final)
    s.tokenizer.save_pretrained(final)
    if ev.after and ev.num_tasks:
        result["after"] = evaluate(s, ev.split, ev.num_tasks, ev.temperature, ev.seed)
        writer.write({"event": "eval_after", **result["after"]})
    writer.close()
    s.pool.close()
    return result


def _mini_batches(n: int, k: int, group: int) -> list[list[int]]:
    """Split n trajectories into k mini-batches along group boundaries (groups stay together)."""
    groups = [list(range(i, min(i + group, n))) for i in range(0, n, group)]
    k = max(1, min(k, len(groups)))
    return [[i for g in groups[j::k] for i in g] for j in range(k)]
