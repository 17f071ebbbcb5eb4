"""The asynchronous schedule on CPU: the producer's gate (never more than max_staleness versions
ahead), errors reaching the trainer, and real training runs whose staleness stays in bounds, in one
process and on two Ray rollout workers (a private Ray per run, every process it started counted
after), one of which is SIGKILLed mid-step."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import agentrl.driver.async_ as async_module
import agentrl.driver.loop as loop_module
from agentrl.config import load_config
from agentrl.driver.async_ import AsyncCollector
from agentrl.driver.loop import train
from agentrl.driver.rollout_side import RolloutSide
from agentrl.envs.registration import ENVS
from agentrl.errors import ConfigError, RolloutError
from agentrl.rollout.engine import ENGINES
from tests.driver.ray_processes import tag  # noqa: F401 (a fixture)

# Registers digits-v0 (reward = share of digits in the reply: varies within a group even untrained).
_spec = importlib.util.spec_from_file_location("agentrl_test_run_train", Path(__file__).with_name("run_train.py"))
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))
_hostile = importlib.util.spec_from_file_location("agentrl_test_run_cli_hostile",
                                                  Path(__file__).resolve().parents[1] / "run_cli_hostile.py")
_hostile.loader.exec_module(importlib.util.module_from_spec(_hostile))

# Ray workers import these by name (a class defined in a test script would not reach them).
if "ray-digits-v0" not in ENVS:
    ENVS.register("ray-digits-v0", "tests.driver.ray_parts:DigitsEnv")
if "test-late-stalling" not in ENGINES:
    ENGINES.register("test-late-stalling", "tests.driver.ray_parts:LateStallingEngine")

ASYNC = ["train.schedule=asynchronous", "algorithm.old_logprobs=recompute", "algorithm.tis=token"]
RAY = ["cluster.mode=ray", "cluster.rollout_workers=2", "cluster.num_cpus=3", "env.id=ray-digits-v0"]


def _cfg(model_dir: str, run_dir: Path, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}", "env.id=digits-v0", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_tokens_per_turn=16", "rollout.max_turns=1", "rollout.max_total_tokens=64", "train.steps=3",
        "optim.lr=0.01", "eval.num_tasks=0", "train.checkpoint_every=0", f"run_dir={run_dir}", *extra])


def _ready_soon(collector: AsyncCollector, step: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with collector._cv:
            if step in collector._ready:
                return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_the_producer_never_runs_more_than_max_staleness_versions_ahead(stopping_model_dir, tmp_path, max_staleness):
    rollout = RolloutSide.open(_cfg(stopping_model_dir, tmp_path, *ASYNC))
    collector = AsyncCollector(rollout, start=0, stop=4, max_staleness=max_staleness)
    try:
        collector.get(0)
        # The engine still holds version 0: step s may start only while 0 >= s - max_staleness.
        assert _ready_soon(collector, 1, 20.0 if max_staleness else 1.0) == (max_staleness >= 1)
        assert not _ready_soon(collector, 2, 1.0)
        collector.weights_pushed(1)
        trajectories, metrics = collector.get(1)
        assert trajectories and metrics["time/trainer/wait_rollout"] >= 0
        assert _ready_soon(collector, 2, 20.0 if max_staleness else 1.0) == (max_staleness >= 1)
    finally:
        collector.close()
        rollout.close()
    assert not collector._thread.is_alive()


def test_a_rollout_failure_reaches_the_trainer(stopping_model_dir, tmp_path):
    """Every task fails in `hostile-seeds-v0` with all seeds failing: the producer's RolloutError is
    raised by the trainer's `get`, not lost on the background thread."""
    cfg = load_config(None, [
        f"model.path={stopping_model_dir}", "env.id=hostile-flaky-v0", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16", "rollout.max_turns=1",
        "rollout.max_total_tokens=64", "failures.min_group_fraction=1.0", "failures.max_retries=0",
        "eval.num_tasks=0", f"run_dir={tmp_path}", *ASYNC])
    rollout = RolloutSide.open(cfg)
    collector = AsyncCollector(rollout, start=0, stop=40, max_staleness=40)
    try:
        with pytest.raises(RolloutError):
            for step in range(40):  # hostile-flaky-v0 fails one task seed in four: some step loses a group
                collector.get(step)
    finally:
        collector.close()
        rollout.close()


def _check_bounded_staleness(history: list[dict], overlap: bool = True) -> None:
    """Three steps with max_staleness=1: finite losses, every trained token in the staleness histogram,
    none more than one version old, and (`overlap`) some one version old after the first step."""
    assert len(history) == 3 and all(math.isfinite(m["loss"]) for m in history)
    for m in history:
        assert m["staleness/max"] <= 1
        versions = {k: v for k, v in m.items() if k.startswith("staleness/") and k[10:].isdigit()}
        assert sum(versions.values()) == m["tokens/trainer/trained"] > 0  # every trained token has a version
        assert "time/trainer/wait_rollout" in m
    # Step 2's episodes start as soon as step 1's are handed over, while step 1 trains; with the pushes
    # held until they have sampled a token (`pushes_wait_for_the_next_play`), they carry version 0 tokens.
    assert history[0]["staleness/max"] == 0
    if overlap:
        assert max(m["staleness/max"] for m in history[1:]) == 1


@pytest.fixture
def pushes_wait_for_the_next_play(monkeypatch):
    """Hold each weight push until the producer has sampled a token of the step it is playing.

    Without it the overlap is a race: on a loaded machine the trainer's thread can finish a (fast,
    tiny-model) update and push before the producer's thread has sampled anything, and then no token
    is one version old. The producer cannot be blocked by this wait: it plays step `v` under version
    `v - 1`, which the gate allows, and a play that finishes ends the wait as well.
    """
    real_collect, real_push = async_module.collect, loop_module.push_weights
    plays: dict[int, list] = {}  # step -> [engine tokens when its play began, play finished]

    def collect(rollout, step):
        plays[step] = [rollout.engine.stats.generated_tokens, False]
        try:
            return real_collect(rollout, step)
        finally:
            plays[step][1] = True

    def push_weights(trainer, rollout, version):
        deadline = time.monotonic() + 60.0
        while version in range(1, rollout.cfg.train.steps) and time.monotonic() < deadline:
            began, finished = plays.get(version, (None, False))
            if finished or (began is not None and rollout.engine.stats.generated_tokens > began):
                break
            time.sleep(0.005)
        return real_push(trainer, rollout, version=version)

    monkeypatch.setattr(async_module, "collect", collect)
    monkeypatch.setattr(loop_module, "push_weights", push_weights)


@pytest.mark.parametrize("correction", [ASYNC[1:], ["algorithm.old_logprobs=rollout"]], ids=["tis", "rollout_ratio"])
def test_an_asynchronous_run_trains_with_bounded_staleness(stopping_model_dir, tmp_path, correction,
                                                           pushes_wait_for_the_next_play):
    result = train(_cfg(stopping_model_dir, tmp_path, ASYNC[0], *correction, "train.max_staleness=1"))
    _check_bounded_staleness(result["history"])
    assert (tmp_path / "final" / "config.json").is_file()


def test_an_asynchronous_run_on_two_ray_rollout_workers_trains_with_bounded_staleness(stopping_model_dir, tmp_path,
                                                                                      tag):
    # The producer's plays run on the workers while this process trains and pushes the weights.
    result = train(_cfg(stopping_model_dir, tmp_path, *ASYNC, "train.max_staleness=1", *RAY))
    history = result["history"]
    # Whether a worker begins step 2's episodes before step 1's weights reach it depends on how fast Ray
    # schedules the call (under a loaded CI machine it once did not): the overlap itself is checked in
    # process above; here the bound, the versions and that nothing failed.
    _check_bounded_staleness(history, overlap=False)
    assert all(m["trained_episodes"] == 4 and m["episode_errors"] == 0 for m in history)
    assert not any(k.startswith(("workers/", "episodes/")) for m in history for k in m)  # nothing failed
    assert (tmp_path / "final" / "config.json").is_file()


def test_a_ray_worker_sigkilled_mid_step_of_an_asynchronous_run(stopping_model_dir, tmp_path, tag, monkeypatch):
    """A worker's engine stops answering its first request made with pushed weights (step 2 or 3: the
    weights of step 1 are pushed while later episodes play) and the worker is SIGKILLed; its episodes
    are played again by the first free worker, the worker restarts with the newest weights, the step
    completes, and no process is left (counted by `tag`)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("AGENTRL_FAULT_DIR", str(faults))  # the run's Ray and workers inherit it
    (faults / "arm-late").write_text("")
    killed: list[int] = []

    def kill_when_stalled():
        deadline = time.monotonic() + 300
        while not (faults / "stalled").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if (faults / "stalled").exists():
            killed.append(int((faults / "claimed").read_text()))
            os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    # health_timeout_s: were the kill to miss, the hang detector would end the stall within a minute.
    result = train(_cfg(stopping_model_dir, tmp_path / "run", *ASYNC, "train.max_staleness=1", *RAY,
                        "rollout.engine=test-late-stalling", "cluster.health_timeout_s=60"))
    killer.join(timeout=1)
    history = result["history"]
    assert killed and len(history) == 3
    [hit] = [m for m in history if "workers/lost" in m]
    assert hit["step"] >= 2 and hit["workers/lost"] == 1 and hit["workers/restarted"] == 1
    assert hit["episodes/rerun"] == 2 and "workers/hung" not in hit and "episodes/lost" not in hit  # one group again
    # Every episode played again arrived: none recorded as failed, none trained as one.
    assert all(m["trained_episodes"] == 4 and m["episode_errors"] == 0 for m in history)
    _check_bounded_staleness(history, overlap=False)


def test_the_asynchronous_schedule_needs_an_importance_correction(stopping_model_dir, tmp_path):
    # A recomputed denominator is the current policy's: without TIS nothing corrects for the sampling one.
    with pytest.raises(ConfigError, match="algorithm.tis=token"):
        _cfg(stopping_model_dir, tmp_path, "train.schedule=asynchronous", "algorithm.old_logprobs=recompute")
    # The engine's own logprobs as the ratio's denominator are the sampling policy's: accepted.
    assert _cfg(stopping_model_dir, tmp_path, "train.schedule=asynchronous").algorithm.old_logprobs == "rollout"
