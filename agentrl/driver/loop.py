"""The training loop: collect episodes, score them, update the policy, hand the weights back.

This is the algorithm in one place; each stage is a named call:

    for step in range(start, steps):
        trajectories = collect(session, step)                  # engine + envs, many episodes at once
        advantages   = outcome_advantages(trajectories)        # group-normalised (GRPO by default)
        metrics      = policy_update(trajectories, advantages) # packed micro-batches, one optimizer step
        engine.update_weights(policy weights)                  # rollouts of the next step use them
        guard(metrics); maybe save_checkpoint(step)            # stop on repeated non-finite steps

Everything a step consumes is a function of (config, step) or of the saved state: task seeds come
from the step number, sampling seeds from the step and the episode index, and a checkpoint holds
the weights, optimizer, scheduler and RNG states, so `--resume` repeats an uninterrupted run exactly.

Nothing fails silently. Before any work, `Session.open` checks the device, the model directory, the
env and every split the run will play (see `preflight.py`), and `RunDir` refuses a run_dir holding
another run. Episodes that fail (an env or engine error) are shown, not only counted: their first
distinct texts go to the console and `metrics.jsonl`; they are never trained on (that failure is
not the policy's doing); and a step or evaluation where more than `rollout.max_error_fraction` of
the episodes failed stops the run with those texts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentrl.config import Config
from agentrl.envs.core import Env
from agentrl.envs.registration import make
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import SamplingParams
from agentrl.rollout.trajectory import Trajectory
from agentrl.tools.blocking import run_blocking
from agentrl.trainer.algos import filter_uniform_groups
from agentrl.trainer.attention import register_varlen_attention
from agentrl.driver.metrics import MetricsWriter, check_episode_errors, error_samples, rollout_metrics
from agentrl.trainer.policy import compile_blocks, export_hf, load_policy, merged_state_dict
from agentrl.driver.preflight import build_env, check_device, check_model_dir, check_splits, reported
from agentrl.driver.resume import NonFiniteGuard, restore_run, save_run
from agentrl.driver.run_dir import RunDir
from agentrl.trainer.update import (LossSettings, episode_kl, outcome_advantages, policy_update,
                                    recompute_logprobs)

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
    def open(cls, cfg: Config, model_path: str | None = None, splits: Sequence[tuple[str, str]] = ()) -> Session:
        """Check, then load, everything a run needs; cheap checks come before expensive loads.

        Args:
            cfg: The run's config.
            model_path: A model directory other than model.path (`agentrl eval --model`).
            splits: (split, where it was given) pairs the session will play, e.g. ("train",
                "env.train_split"); each must exist and its prompts must fit rollout.max_total_tokens.
        """
        path = model_path or cfg.model.path
        field = "--model" if model_path else "model.path"
        check_device(cfg.model.device)
        check_model_dir(path, field, cfg.rollout.max_total_tokens)
        probe = build_env(cfg.env.id, cfg.env.kwargs)
        try:
            return cls._load(cfg, path, field, probe, splits)
        except BaseException:
            probe.close()  # an env may hold a subprocess or a connection
            raise

    @classmethod
    def _load(cls, cfg: Config, path: str, field: str, probe: Env, splits: Sequence[tuple[str, str]]) -> Session:
        from transformers import AutoTokenizer

        r = cfg.rollout
        fix = f"check that {field} holds a complete Hugging Face causal LM, saved with save_pretrained"
        with reported(f"cannot load the tokenizer of {field} {path!r}", fix):
            tokenizer = AutoTokenizer.from_pretrained(path)
        with reported(f"cannot render prompts with the chat template of {field} {path!r}", fix):
            renderer = ChatRenderer(tokenizer, probe.tool_schemas(), template_kwargs=cfg.model.chat_template_kwargs)
            check_splits(probe, cfg.env.id, splits, lambda messages: len(renderer.prompt_ids(messages)),
                         r.max_total_tokens, r.max_tokens_per_turn)
        engine_dtype = _DTYPES[cfg.model.dtype]
        train_dtype = torch.float32 if cfg.train.mixed_precision == "bf16" else engine_dtype
        lora = cfg.model.lora
        with reported(f"cannot load the model in {field} {path!r}", fix):
            policy = load_policy(path, dtype=train_dtype, device=cfg.model.device,
                                 attn_implementation=register_varlen_attention(), lora_rank=lora.rank,
                                 lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_targets=lora.target_modules,
                                 gradient_checkpointing=cfg.train.gradient_checkpointing)
            engine = EmbeddedEngine(path, device=cfg.model.device, dtype=engine_dtype,
                                    max_model_len=r.max_total_tokens + 1)
        if cfg.train.compile:
            compile_blocks(policy)
        pool = EnvPool(lambda: make(cfg.env.id, **cfg.env.kwargs))
        pool.give(probe)
        return cls(cfg, tokenizer, policy, engine, pool, renderer)

    def sampling(self, temperature: float, seed: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_tokens=r.max_tokens_per_turn, seed=seed)

    def limits(self) -> EpisodeLimits:
        return EpisodeLimits(max_turns=self.cfg.rollout.max_turns, max_total_tokens=self.cfg.rollout.max_total_tokens)

    def play(self, specs: list[EpisodeSpec], temperature: float, seed: int | None = None) -> list[Trajectory]:
        lock = self.cfg.rollout.lockstep
        lockstep = lock == "on" or (lock == "auto" and torch.device(self.cfg.model.device).type == "cpu")
        # run_blocking, not asyncio.run: its shutdown waits a bounded time for a tool that ignores cancellation
        return run_blocking(run_episodes(self.engine, self.pool, self.renderer, self.sampling(temperature, seed),
                                         self.limits(), specs, env_id=self.cfg.env.id, lockstep=lockstep))

    def push_weights(self, version: int) -> None:
        self.engine.update_weights(merged_state_dict(self.policy), version=version)


def evaluate(session: Session, split: str, num_tasks: int, temperature: float, seed: int) -> dict[str, Any]:
    """Success rate on tasks 0..num_tasks-1 of a held-out split (one episode each), with the first
    distinct episode-error texts under `error_samples`; raises `RolloutError` when more than
    rollout.max_error_fraction of the episodes failed (a failed episode is not a policy failure)."""
    t0 = time.perf_counter()
    trajs = session.play([EpisodeSpec(seed=i, split=split, group_id=i) for i in range(num_tasks)], temperature, seed)
    check_episode_errors(trajs, session.cfg.rollout.max_error_fraction, f"evaluation on split {split!r}")
    return _with_errors(rollout_metrics(trajs, time.perf_counter() - t0), trajs)


def _with_errors(metrics: dict[str, Any], trajectories: list[Trajectory]) -> dict[str, Any]:
    samples = error_samples(trajectories)
    return {**metrics, "error_samples": samples} if samples else metrics


def task_seeds(step: int, prompts_per_step: int, seed: int, round: int = 0) -> list[int]:
    """The data order: a fixed shuffled stream of training-task seeds, sliced by step (and refill round)."""
    rng = random.Random(seed * 7919 + step if round == 0 else ((seed * 7919 + step) * 31 + round) * 17)
    return [rng.randrange(2**31 - 1) for _ in range(prompts_per_step)]


def collect(s: Session, step: int) -> tuple[list[Trajectory], dict[str, Any]]:
    """One step's episodes to train on. Failed episodes (`Trajectory.error`) are dropped: an env or
    engine failure is not the policy's doing, so it must not be trained as a zero reward; when more
    than rollout.max_error_fraction of a round failed, `RolloutError` stops the run. With dynamic
    sampling, groups whose rewards are all equal are dropped and more tasks are played (up to
    `max_sampling_rounds` rounds) until `prompts_per_step` groups remain."""
    cfg, r, a = s.cfg, s.cfg.rollout, s.cfg.algorithm
    t0 = time.perf_counter()
    played: list[Trajectory] = []
    kept: list[Trajectory] = []
    rounds = a.max_sampling_rounds if a.dynamic_sampling else 1
    for rnd in range(rounds):
        specs = [EpisodeSpec(seed=seed, split=cfg.env.train_split, group_id=rnd * r.prompts_per_step + g)
                 for g, seed in enumerate(task_seeds(step, r.prompts_per_step, cfg.train.seed, rnd))
                 for _ in range(r.samples_per_prompt)]
        trajs = s.play(specs, r.temperature, seed=(cfg.train.seed * 100_003 + step) * 101 + rnd)
        check_episode_errors(trajs, r.max_error_fraction, f"step {step + 1}")
        played += trajs
        sound = [t for t in trajs if t.error is None]
        if not a.dynamic_sampling:
            kept = sound
            break
        keep = filter_uniform_groups(torch.tensor([t.reward for t in sound]), torch.tensor([t.group_id for t in sound]))
        kept += [t for t, k in zip(sound, keep.tolist()) if k]
        if len(kept) >= r.prompts_per_step * r.samples_per_prompt:
            break
    metrics = _with_errors(rollout_metrics(played, time.perf_counter() - t0), played)
    kept = kept[: r.prompts_per_step * r.samples_per_prompt]
    metrics.update(sampling_rounds=float(rnd + 1), kept_groups=float(len({t.group_id for t in kept})),
                   trained_episodes=float(len(kept)))
    return kept, metrics


def reference_logprobs(s: Session, ref: torch.nn.Module | None, trajs: list[Trajectory]) -> list[list[float]]:
    """Logprob rows of the starting policy (LoRA: the same model with its adapters switched off)."""
    t = s.cfg.train
    temp = s.cfg.rollout.temperature if s.cfg.rollout.temperature > 0 else 1.0
    if ref is None:  # LoRA
        with s.policy.disable_adapter():
            return recompute_logprobs(s.policy, trajs, t.micro_batch_tokens, temp, t.logprob_chunk)
    return recompute_logprobs(ref, trajs, t.micro_batch_tokens, temp, t.logprob_chunk)


def train_step(s: Session, optimizer, scheduler, ref, step: int) -> dict[str, Any]:
    """Collect, score, update; returns the step's metrics."""
    cfg, a, r = s.cfg, s.cfg.algorithm, s.cfg.rollout
    t0 = time.perf_counter()
    trajectories, metrics = collect(s, step)
    metrics["rollout_s"] = time.perf_counter() - t0
    refs = reference_logprobs(s, ref, trajectories) if a.kl_coef > 0 else None
    scores = [t.reward for t in trajectories]
    if refs is not None and a.kl_mode == "reward":  # the KL becomes part of each episode's score
        penalty = episode_kl(trajectories, refs, a.kl_kind)
        scores = [sc - a.kl_coef * kl for sc, kl in zip(scores, penalty)]
        refs = None
    settings = LossSettings(a.policy_loss, a.agg_mode, a.clip_low, a.clip_high, a.entropy_coef,
                            temperature=r.temperature if r.temperature > 0 else 1.0, old_logprobs=a.old_logprobs,
                            kl_coef=a.kl_coef if refs is not None else 0.0, kl_kind=a.kl_kind, tis=a.tis,
                            tis_cap=a.tis_cap)
    advantages = outcome_advantages(trajectories, a.advantage, scores,
                                    **({"norm_by_std": a.norm_by_std} if a.advantage == "grpo" else {}))
    compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
    for idx in _group_mini_batches([t.group_id for t in trajectories], cfg.train.mini_batches):
        upd = policy_update(s.policy, optimizer, [trajectories[i] for i in idx], [advantages[i] for i in idx],
                            settings, micro_batch_tokens=cfg.train.micro_batch_tokens, grad_clip=cfg.optim.grad_clip,
                            logprob_chunk=cfg.train.logprob_chunk, compute_dtype=compute, compiled=cfg.train.compile,
                            ref_logprobs=[refs[i] for i in idx] if refs is not None else None)
        scheduler.step()
        metrics.update({k: max(v, metrics.get(k, 0.0)) if k == "nonfinite" else v for k, v in upd.items()})
    s.push_weights(version=step + 1)
    metrics.update(step=step + 1, step_s=time.perf_counter() - t0)
    return metrics


def train(cfg: Config, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          resume: bool = False, overwrite: bool = False) -> dict[str, object]:
    """Run `cfg` end to end (or continue it from its latest checkpoint); returns
    {"before": ..., "after": ..., "history": [...], "resumed_from": step or None}.

    A run_dir that holds another run is refused unless `resume` (continue it) or `overwrite`
    (replace it, once the new run's checks pass) is given; see `RunDir`.
    """
    run = RunDir(cfg.run_dir, resume=resume, overwrite=overwrite)
    run.claim()  # a file, another run or an unwritable path is refused before anything loads
    with run.failure_record():  # failing before step 1 leaves nothing behind; later, an `error` record
        return _run(cfg, run, on_step, resume)


def _run(cfg: Config, run: RunDir, on_step, resume: bool) -> dict[str, object]:
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    ev = cfg.eval
    evaluating = ev.num_tasks > 0 and (ev.before or ev.after)
    splits = [(cfg.env.train_split, "env.train_split")] + ([(ev.split, "eval.split")] if evaluating else [])
    s = Session.open(cfg, splits=splits)
    try:
        return _run_session(s, run, on_step, resume)
    finally:
        s.pool.close()


def _run_session(s: Session, run: RunDir, on_step, resume: bool) -> dict[str, object]:
    cfg, ev = s.cfg, s.cfg.eval
    run.start()
    run_dir = run.path
    optimizer = torch.optim.AdamW([p for p in s.policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                                  fused=torch.device(cfg.model.device).type == "cuda")
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    ref = _reference_model(cfg) if cfg.algorithm.kl_coef > 0 and cfg.model.lora.rank == 0 else None
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    result: dict[str, object] = {"history": [], "resumed_from": None}
    start = 0
    if resume:
        restored = restore_run(run_dir, cfg, s.policy, optimizer, scheduler, guard)
        start = restored.step
        s.push_weights(version=start)
        result["resumed_from"] = start
        for event in restored.events():  # skipped corrupt checkpoints, then the resume itself
            writer.write(event)
    else:
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        if ev.before and ev.num_tasks:
            result["before"] = evaluate(s, ev.split, ev.num_tasks, ev.temperature, ev.seed)
            writer.write({"event": "eval_before", **result["before"]})
    for step in range(start, cfg.train.steps):
        metrics = train_step(s, optimizer, scheduler, ref, step)
        metrics["nonfinite_steps"] = guard.observe(bool(metrics.get("nonfinite", 0.0)))
        writer.write(metrics)
        run.step_done()
        result["history"].append(metrics)
        if on_step:
            on_step(step + 1, metrics)
        guard.check(step + 1, run_dir)  # stops before checkpointing a run that has gone bad
        every = cfg.train.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps:
            save_run(run_dir, cfg, step + 1, s.policy, optimizer, scheduler, guard)
    export_hf(s.policy, s.tokenizer, run_dir / "final")
    if ev.after and ev.num_tasks:
        result["after"] = evaluate(s, ev.split, ev.num_tasks, ev.temperature, ev.seed)
        writer.write({"event": "eval_after", **result["after"]})
    writer.close()
    return result


def _reference_model(cfg: Config) -> torch.nn.Module:
    """A frozen copy of the starting policy for the KL term."""
    ref = load_policy(cfg.model.path, dtype=_DTYPES[cfg.model.dtype], device=cfg.model.device,
                      attn_implementation=register_varlen_attention())
    return ref.requires_grad_(False)


def _mini_batches(n: int, k: int, group: int) -> list[list[int]]:
    """Split n trajectories, in consecutive groups of `group`, into k mini-batches (groups stay together)."""
    return _group_mini_batches([i // group for i in range(n)], k)


def _group_mini_batches(group_ids: list[int], k: int) -> list[list[int]]:
    """Split trajectories into k mini-batches by group id (groups stay together; groups may differ in
    size once failed episodes are dropped)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    order = list(groups.values())
    k = max(1, min(k, len(order)))
    return [[i for g in order[j::k] for i in g] for j in range(k)]

