"""The training loop: collect episodes, score them, update the policy, hand the weights back.

This is the algorithm in one place; each stage is a named call:

    rollout, trainer = open_sides(cfg)                  # engine + envs | policy + optimizer, here or Ray workers
    for step in range(start, steps):
        trajectories, metrics = collect(rollout, step)     # many episodes at once; failures settled by class
        batch = to_batch(trajectories, shaping)             # tensors, once: ids, masks, logprobs, turn rewards
        with engines_asleep(rollout):                       # colocated: the engines free memory meanwhile
            batch, kl_in_loss = score(batch, trainer, algo) # advantages (critic values, reference logprobs)
            metrics |= trainer.update(batch, settings)      # packed micro-batches, one step per mini-batch (and critic)
        push_weights(trainer, rollout, step + 1)            # rollouts of the next step use them
        guard(metrics); maybe trainer.save(step)            # stop on repeated non-finite steps
        sinks.write(metrics); log.write(step, trajectories) # metrics.jsonl, TensorBoard, wandb; episodes for the report

The rollout side and the trainer side never meet except here: trajectories become a `TrainBatch`
(`batch.py`) and weights go back through `weight_sync.py`. Each step's wall time is split by role
into the phases above and idle time (`timing.py`); the metrics' keys are explained in `metrics.py`.

Nothing fails silently. Before any work the sides check the device, the model directory, the env
and every split the run will play (see `preflight.py`), and `RunDir` refuses a run_dir holding
another run. Episodes the infrastructure broke (an env or engine error, a hung request or episode,
...) are classified, retried, dropped or masked by class (`failures.py`), never trained on, and
shown, not only counted: their classes and first distinct texts go to the console and
`metrics.jsonl`; a step or evaluation where fewer than `failures.min_group_fraction` of the task
groups arrived stops the run with those texts. SIGTERM or Ctrl-C stops the run after a final
checkpoint (`signals.py`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agentrl.config import Config, TrainConfig
from agentrl.driver.async_ import AsyncCollector, check_staleness
from agentrl.driver.batch import RewardShaping, score, to_batch
from agentrl.driver.collect import collect, evaluate
from agentrl.driver.colocated import engines_asleep
from agentrl.driver.metrics import staleness_metrics, trainer_metrics
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.run_dir import RunDir
from agentrl.driver.sides import open_sides
from agentrl.driver.signals import StopSignals, stopped
from agentrl.driver.tasks import scale_advantages_per_env
from agentrl.driver.sinks import check_sinks, open_sinks
from agentrl.driver.timing import StepClock
from agentrl.driver.trainer_side import TrainerSide
from agentrl.driver.trajectory_log import TrajectoryLog, learning_signal
from agentrl.driver.weight_sync import push_weights
from agentrl.errors import RunInterrupted


def train_step(rollout: RolloutSide, trainer: TrainerSide, step: int, clock: StepClock,
               ahead: AsyncCollector | None = None, stop: StopSignals | None = None,
               log: TrajectoryLog | None = None) -> dict[str, Any]:
    """Collect (or take what `ahead` played), score, update, push the weights; returns the step's
    metrics (its phase times go on `clock`). `rollout` and `trainer` may as well be their Ray
    versions (`RayRolloutSide`, `RayTrainerSide`); a signal in `stop` ends the step while it plays;
    `log` saves a sample of the step's episodes for `agentrl report`."""
    with stop.interruptible() if stop else contextlib.nullcontext():  # playing changes no state: stop at once
        if ahead is None:
            trajectories, metrics = collect(rollout, step)  # times its episodes: time/rollout/{episodes,engine,env}
            clock.add("episodes", metrics["time/rollout/episodes"], "rollout")
            metrics |= rollout.worker_metrics()  # workers lost, hung or restarted, episodes played again (Ray)
        else:  # played on the collector's thread, overlapping earlier updates (worker counts included)
            trajectories, metrics = ahead.get(step)
            clock.add("wait_rollout", metrics.pop("time/trainer/wait_rollout"), "trainer")
    metrics |= learning_signal(trajectories, rollout.tokenizer)  # groups whose rewards were all equal
    with engines_asleep(rollout, clock, rollout.cfg.cluster.colocate):
        with clock.phase("score", "trainer"):
            algo = rollout.cfg.algorithm  # each turn's reward on its last token, less the configured penalties
            batch, kl_in_loss = score(to_batch(trajectories, RewardShaping.of(algo)), trainer, algo)
            batch = scale_advantages_per_env(batch, trajectories, rollout.cfg)  # several envs: one scale each
        with clock.phase("update", "trainer"):
            metrics.update(trainer.update(batch, trainer.loss_settings(kl_in_loss)))
    clock.add("weight_sync", push_weights(trainer, rollout, version=step + 1), "trainer", "rollout")
    if ahead is not None:
        ahead.weights_pushed(step + 1)
    if log is not None:
        log.write(step + 1, trajectories, batch)
    metrics |= trainer_metrics(batch, clock.seconds("trainer", "update"))
    metrics |= staleness_metrics(batch.weight_versions, batch.mask, policy_version=step)
    check_staleness(metrics, rollout.cfg.train.max_staleness if ahead else 0, step)
    metrics["step"] = step + 1
    return metrics


def train(cfg: Config, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          resume: bool = False, overwrite: bool = False) -> dict[str, object]:
    """Run `cfg` end to end (or continue it from its latest checkpoint); returns
    {"before": ..., "after": ..., "history": [...], "resumed_from": step or None}.

    A run_dir that holds another run is refused unless `resume` (continue it) or `overwrite`
    (replace it, once the new run's checks pass) is given; see `RunDir`.
    """
    check_sinks(cfg.metrics)  # a configured sink that cannot work is refused before anything else
    run = RunDir(cfg.run_dir, resume=resume, overwrite=overwrite)
    run.claim()  # a file, another run or an unwritable path is refused before anything loads
    with run.failure_record():  # failing before step 1 leaves nothing behind; later, an `error` record
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        ev = cfg.eval
        evaluating = ev.num_tasks > 0 and (ev.before or ev.after)
        splits = [(cfg.env.train_split, "env.train_split")] + ([(ev.split, "eval.split")] if evaluating else [])
        with open_sides(cfg, splits) as (rollout, trainer), StopSignals() as stop:
            return _run(rollout, trainer, run, on_step, resume, stop)


def _run(rollout: RolloutSide, trainer: TrainerSide, run: RunDir, on_step, resume: bool,
         stop: StopSignals) -> dict[str, object]:
    cfg, ev = rollout.cfg, rollout.cfg.eval
    run.start()
    restored = trainer.restore(run.path) if resume else None
    start = restored.step if restored else 0
    result: dict[str, object] = {"history": [], "resumed_from": start if restored else None}
    with contextlib.closing(open_sinks(cfg, run.path, start_step=start)) as sinks:  # closed (flushed) on any exit
        saved = [start]  # the newest checkpointed step (the one resumed from, at first)
        try:
            if restored:
                push_weights(trainer, rollout, version=start)
                for event in restored.events():  # skipped corrupt checkpoints, then the resume itself
                    sinks.write(event)
            else:
                (run.path / "config.json").write_text(cfg.model_dump_json(indent=2))
                if ev.before and ev.num_tasks:
                    with stop.interruptible():
                        result["before"] = evaluate(rollout, ev.split, ev.num_tasks, ev.temperature, ev.seed)
                    sinks.write({"event": "eval_before", **result["before"]})
            ahead = (AsyncCollector(rollout, start, cfg.train.steps, cfg.train.max_staleness)
                     if cfg.train.schedule == "asynchronous" else None)
            log = TrajectoryLog.open(cfg, run.path, rollout.tokenizer)
            with contextlib.closing(ahead) if ahead else contextlib.nullcontext():
                _train_steps(rollout, trainer, run, sinks, result, on_step, start, ahead, stop, saved, log)
            trainer.export(run.path / "final", rollout.tokenizer)
            if ev.after and ev.num_tasks:
                with stop.interruptible():
                    result["after"] = evaluate(rollout, ev.split, ev.num_tasks, ev.temperature, ev.seed)
                sinks.write({"event": "eval_after", **result["after"]})
        except RunInterrupted as exc:  # the last whole step is checkpointed: `--resume` continues from it
            raise stopped(exc, trainer, run.path, sinks, start + len(result["history"]), saved[0]) from None
    return result


def _train_steps(rollout: RolloutSide, trainer: TrainerSide, run: RunDir, sinks, result: dict, on_step, start: int,
                 ahead: AsyncCollector | None, stop: StopSignals, saved: list[int], log: TrajectoryLog | None) -> None:
    """Steps `start`.. of the run: train, record, checkpoint when due (noting it in `saved`), stop a
    run gone bad, or one that was sent a signal once its step is whole."""
    t = rollout.cfg.train
    for step in range(start, t.steps):
        clock = StepClock()
        metrics = train_step(rollout, trainer, step, clock, ahead, stop, log)
        metrics["nonfinite_steps"] = trainer.guard.observe(bool(metrics.get("nonfinite", 0.0)))
        run.step_done()
        try:
            if _save_if_due(trainer, run.path, t, step + 1, clock):
                saved[0] = step + 1
        finally:  # the step's record is kept even when saving fails
            metrics |= clock.metrics()
            sinks.write(metrics)
        result["history"].append(metrics)
        if on_step:
            on_step(step + 1, metrics)
        trainer.guard.check(step + 1, run.path)
        stop.check()  # a signal during the update lands here, once the step is whole (and saved when due)


def _save_if_due(trainer: TrainerSide, run_dir: Path, t: TrainConfig, done: int, clock: StepClock) -> bool:
    """Checkpoint every `checkpoint_every` steps and after the last, unless the guard is about to stop
    the run (a run that has gone bad is not saved over its last good checkpoint); whether it saved."""
    if ((t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps) and not trainer.guard.tripped:
        with clock.phase("checkpoint", "trainer"):
            trainer.save(run_dir, done)
        return True
    return False
