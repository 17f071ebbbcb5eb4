"""Colocated mode in one process: the engine really frees its KV cache while the trainer steps, takes it
back after, and the run is bit for bit the run without colocation (the cache held nothing the next
step could use: new weights empty the prefix cache anyway)."""

from __future__ import annotations

from pathlib import Path

from agentrl.config import load_config
from agentrl.driver.loop import train, train_step
from agentrl.driver.sides import open_sides
from agentrl.driver.timing import StepClock
from agentrl.envs.registration import ENVS

if "ray-digits-v0" not in ENVS:
    ENVS.register("ray-digits-v0", "tests.driver.ray_parts:DigitsEnv")


def _cfg(model_dir: str, run_dir: Path, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}", "env.id=ray-digits-v0", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=3",
        "rollout.max_tokens_per_turn=16", "rollout.max_turns=1", "rollout.max_total_tokens=64", "optim.lr=0.01",
        "train.steps=2", "train.checkpoint_every=0", "eval.num_tasks=0", f"run_dir={run_dir}", *extra])


def test_the_engine_sleeps_during_the_update(stopping_model_dir, tmp_path):
    cfg = _cfg(stopping_model_dir, tmp_path, "cluster.colocate=true")
    with open_sides(cfg, [("train", "env.train_split")]) as (rollout, trainer):
        seen = []
        update = trainer.update

        def observed_update(batch, settings):  # the real update; it only looks at the engine first
            seen.append((rollout.engine._asleep, rollout.engine._cache is None))
            return update(batch, settings)

        trainer.update = observed_update
        train_step(rollout, trainer, 0, StepClock())
        assert seen == [(1, True)]  # asleep, KV cache freed
        assert not rollout.engine._asleep and rollout.engine.weight_version == 1
        # Awake again: step 2 plays every episode (an asleep engine refuses requests, and they would
        # come back as episode errors), on a cache allocated anew, and sleeps for its update again.
        clock = StepClock()
        metrics = train_step(rollout, trainer, 1, clock)
        assert metrics["trained_episodes"] == 6 and metrics["episode_errors"] == 0
        assert seen == [(1, True), (1, True)]
        assert clock.metrics()["time/rollout/sleep"] >= 0 and clock.metrics()["time/rollout/wake"] >= 0


def test_colocated_run_equals_the_plain_one(stopping_model_dir, tmp_path):
    plain = train(_cfg(stopping_model_dir, tmp_path / "plain"))["history"]
    colocated = train(_cfg(stopping_model_dir, tmp_path / "colocated", "cluster.colocate=true"))["history"]
    assert plain[1]["loss"] != 0.0
    for a, b in zip(plain, colocated, strict=True):
        assert (a["loss"], a["grad_norm"], a["reward_mean"]) == (b["loss"], b["grad_norm"], b["reward_mean"])
        assert "time/rollout/sleep" in b and "time/rollout/sleep" not in a
