"""The training loop: collect episodes, score them, update the policy, hand the weights back.

This is the algorithm in one place; each stage is a named call:

    rollout, trainer = RolloutSide.open(cfg), TrainerSide.open(cfg)   # engine + envs | policy + optimizer
    for step in range(start, steps):
        trajectories, metrics = collect(rollout, step)     # many episodes at once; failures settled by class
        batch = to_batch(trajectories)                      # tensors, once: ids, masks, logprobs, versions
        batch, kl_in_loss = score(batch, trainer, algo)     # advantages (and the reference's logprobs)
        metrics |= trainer.update(batch, settings)          # packed micro-batches, one step per mini-batch
        push_weights(trainer, rollout, step + 1)            # rollouts of the next step use them
        guard(metrics); maybe trainer.save(step)            # stop on repeated non-finite steps

The rollout side and the trainer side never meet except here: trajectories become a `TrainBatch`
(`batch.py`) and weights go back through `weight_sync.py`.

Nothing fails silently. Before any work the sides check the device, the model directory, the env
and every split the run will play (see `preflight.py`), and `RunDir` refuses a run_dir holding
another run. Episodes the infrastructure broke (an env or engine error, a hung request or episode,
...) are classified, retried, dropped or masked by class (`failures.py`), never trained on, and
shown, not only counted: their classes and first distinct texts go to the console and
`metrics.jsonl`; a step or evaluation where fewer than `failures.min_group_fraction` of the task
groups arrived stops the run with those texts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from agentrl.config import Config
from agentrl.driver.batch import score, to_batch
from agentrl.driver.collect import collect, evaluate
from agentrl.driver.metrics import MetricsWriter
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.run_dir import RunDir
from agentrl.driver.trainer_side import TrainerSide
from agentrl.driver.weight_sync import push_weights


def train_step(rollout: RolloutSide, trainer: TrainerSide, step: int) -> dict[str, Any]:
    """Collect, score, update, push the weights; returns the step's metrics."""
    t0 = time.perf_counter()
    trajectories, metrics = collect(rollout, step)
    metrics["rollout_s"] = time.perf_counter() - t0
    batch, kl_in_loss = score(to_batch(trajectories), trainer, rollout.cfg.algorithm)
    t1 = time.perf_counter()
    metrics.update(trainer.update(batch, trainer.loss_settings(kl_in_loss)))
    metrics["update_s"] = time.perf_counter() - t1
    metrics["weight_sync_s"] = push_weights(trainer, rollout, version=step + 1)
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
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        ev = cfg.eval
        evaluating = ev.num_tasks > 0 and (ev.before or ev.after)
        splits = [(cfg.env.train_split, "env.train_split")] + ([(ev.split, "eval.split")] if evaluating else [])
        rollout = RolloutSide.open(cfg, splits=splits)
        try:
            return _run(rollout, TrainerSide.open(cfg, rollout.path), run, on_step, resume)
        finally:
            rollout.close()


def _run(rollout: RolloutSide, trainer: TrainerSide, run: RunDir, on_step, resume: bool) -> dict[str, object]:
    cfg, ev = rollout.cfg, rollout.cfg.eval
    run.start()
    writer = MetricsWriter(run.path / "metrics.jsonl")
    result: dict[str, object] = {"history": [], "resumed_from": None}
    start = 0
    if resume:
        restored = trainer.restore(run.path)
        start = result["resumed_from"] = restored.step
        push_weights(trainer, rollout, version=start)
        for event in restored.events():  # skipped corrupt checkpoints, then the resume itself
            writer.write(event)
    else:
        (run.path / "config.json").write_text(cfg.model_dump_json(indent=2))
        if ev.before and ev.num_tasks:
            result["before"] = evaluate(rollout, ev.split, ev.num_tasks, ev.temperature, ev.seed)
            writer.write({"event": "eval_before", **result["before"]})
    for step in range(start, cfg.train.steps):
        metrics = train_step(rollout, trainer, step)
        metrics["nonfinite_steps"] = trainer.guard.observe(bool(metrics.get("nonfinite", 0.0)))
        writer.write(metrics)
        run.step_done()
        result["history"].append(metrics)
        if on_step:
            on_step(step + 1, metrics)
        trainer.guard.check(step + 1, run.path)  # stops before checkpointing a run that has gone bad
        every = cfg.train.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps:
            trainer.save(run.path, step + 1)
    trainer.export(run.path / "final", rollout.tokenizer)
    if ev.after and ev.num_tasks:
        result["after"] = evaluate(rollout, ev.split, ev.num_tasks, ev.temperature, ev.seed)
        writer.write({"event": "eval_after", **result["after"]})
    writer.close()
    return result
