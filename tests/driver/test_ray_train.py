"""`train` with Ray workers on a real Ray (CPU): the calculator job on two rollout workers, colocated
engines asleep during the update, and FSDP2 trainer ranks that take the in-process trainer's step and
write checkpoints either can resume. One Ray session serves the module."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.collect import evaluate
from agentrl.driver.loop import train, train_step
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.sides import open_sides
from agentrl.driver.timing import StepClock
from agentrl.envs.registration import ENVS
from agentrl.trainer.checkpoint import latest_checkpoint, load_checkpoint

if "ray-digits-v0" not in ENVS:  # registered here only: the workers get the entry from the driver
    ENVS.register("ray-digits-v0", "tests.driver.ray_parts:DigitsEnv")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _cfg(model_dir: str, run_dir: Path, *extra: str, env: str = "calculator-v0"):
    return load_config(None, [
        f"model.path={model_dir}", f"env.id={env}", "cluster.mode=ray", "cluster.rollout_workers=2",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=24",
        "rollout.max_turns=2", "rollout.max_total_tokens=256", "optim.lr=0.01", "train.micro_batch_tokens=256",
        "eval.num_tasks=0", f"run_dir={run_dir}", *extra])


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_three_steps_of_the_calculator_job_on_two_rollout_workers(ray_session, stopping_model_dir, tmp_path):
    # The tiny model earns no calculator reward yet (every advantage is 0), so an entropy bonus gives
    # the update a gradient; evaluation is greedy so that it can be compared with one engine below.
    cfg = _cfg(stopping_model_dir, tmp_path, "train.steps=3", "eval.num_tasks=4", "eval.temperature=0",
               "algorithm.entropy_coef=0.01")
    result = train(cfg)
    hist = result["history"]
    assert [m["step"] for m in hist] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["time/trainer/weight_sync"] > 0 for m in hist)
    assert all(m["trained_episodes"] == 4 and m["episode_errors"] == 0 for m in hist)
    assert not any(k.startswith(("workers/", "episodes/")) for m in hist for k in m)  # nothing failed
    for m in hist:  # the workers' engine use, summed: every sampled token counted once; busy within the wall time
        assert m["tokens/rollout/generated"] == m["response_tokens_mean"] * m["episodes"] > 0
        assert 0 < m["time/rollout/engine"] <= m["time/rollout/episodes"]
    start, final = _weights(stopping_model_dir), _weights(tmp_path / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)
    # The workers evaluated with step 3's weights: one in-process engine loaded from the export plays
    # the same greedy episodes.
    local = RolloutSide.open(cfg, model_path=str(tmp_path / "final"))
    try:
        again = evaluate(local, cfg.eval.split, cfg.eval.num_tasks, cfg.eval.temperature, cfg.eval.seed)
    finally:
        local.close()
    for key in ("response_tokens_mean", "turns_mean", "tool_calls_mean", "reward_mean"):
        assert result["after"][key] == again[key], key


def test_colocated_engines_sleep_while_the_trainer_steps(ray_session, stopping_model_dir, tmp_path):
    cfg = _cfg(stopping_model_dir, tmp_path, "cluster.colocate=true", "train.steps=1")
    with open_sides(cfg, [("train", "env.train_split")]) as (rollout, trainer):
        asleep_during_update = []
        update = trainer.update

        def observed_update(batch, settings):  # the real update; it only looks at the workers first
            asleep_during_update.append([h.asleep for h in rollout.health()])
            return update(batch, settings)

        trainer.update = observed_update
        clock = StepClock()
        train_step(rollout, trainer, 0, clock)
        after = rollout.health()
    assert asleep_during_update == [[True, True]]
    assert [(h.asleep, h.version) for h in after] == [(False, 1), (False, 1)]  # awake, with step 1's weights
    times = clock.metrics()
    assert times["time/rollout/sleep"] > 0 and times["time/rollout/wake"] >= 0
    assert times["time/rollout/weight_sync"] > 0


def _state(run_dir: Path) -> dict:
    state, _ = load_checkpoint(latest_checkpoint(run_dir))
    return state


def test_fsdp_trainer_ranks_take_the_in_process_step_and_share_its_checkpoints(ray_session, stopping_model_dir,
                                                                               tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("train.steps=1", "train.checkpoint_every=1", "train.keep_checkpoints=5", "rollout.max_turns=1",
              "rollout.max_tokens_per_turn=16", "rollout.max_total_tokens=64")
    ref = train(_cfg(stopping_model_dir, one, *common, env="ray-digits-v0"))["history"][0]
    got = train(_cfg(stopping_model_dir, two, *common, "cluster.trainer_workers=2", env="ray-digits-v0"))["history"][0]
    assert ref["loss"] != 0.0 and ref["grad_norm"] > 0  # rewards differ within groups: a real policy gradient
    # Same rollouts (same engines, weights and seeds), then one step sharded over two gloo ranks.
    assert got["trained_tokens"] == ref["trained_tokens"]
    for key in ("loss", "grad_norm", "entropy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    a, b = _state(one), _state(two)
    assert sorted(a["policy"]) == sorted(b["policy"])
    # AdamW's first step moves each weight by about lr * sign(gradient); where a gradient is near
    # AdamW's eps that step hangs on its last bits, so weights agree to lr / 100 (lr = 0.01), and the
    # gradients themselves (the optimizer's first moments, below) tightly.
    for k in a["policy"]:
        torch.testing.assert_close(b["policy"][k], a["policy"][k], atol=1e-4, rtol=0)
    # The ranks' optimizer state comes back in torch.optim's own numbering, entry for entry.
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
    assert a["optimizer"]["param_groups"][0]["params"] == b["optimizer"]["param_groups"][0]["params"]
    for i, entry in a["optimizer"]["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][name], value, atol=1e-9, rtol=1e-3)
    assert a["scheduler"] == b["scheduler"]
    # Either checkpoint resumes on the other layout: two ranks load the in-process one and vice versa.
    cross_one, cross_two = tmp_path / "cross-one", tmp_path / "cross-two"
    shutil.copytree(one, cross_two)
    shutil.copytree(two, cross_one)
    later = ("train.steps=2", *common[1:])
    step2_two = train(_cfg(stopping_model_dir, cross_two, *later, "cluster.trainer_workers=2", env="ray-digits-v0"),
                      resume=True)
    step2_one = train(_cfg(stopping_model_dir, cross_one, *later, env="ray-digits-v0"), resume=True)
    assert step2_two["resumed_from"] == step2_one["resumed_from"] == 1
    x, y = step2_two["history"][0], step2_one["history"][0]
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-5)
    assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def test_fsdp_trainer_ranks_hold_the_critic(ray_session, stopping_model_dir, tmp_path):
    """PPO with a critic on two FSDP2 ranks: a one-process checkpoint (policy and critic) resumes there, the
    ranks value the batch and take both steps as one process does, and write the critic back in the
    single-process format and beside the exported policy."""
    from agentrl.trainer.attention import register_varlen_attention
    from agentrl.trainer.critic import load_critic

    common = ("train.checkpoint_every=1", "train.keep_checkpoints=5", "rollout.max_turns=1",
              "rollout.max_tokens_per_turn=16", "rollout.max_total_tokens=64", "algorithm.advantage=gae",
              "critic.lr=0.01")
    first = tmp_path / "first"
    train(_cfg(stopping_model_dir, first, "train.steps=1", *common, env="ray-digits-v0"))
    local, ranks = tmp_path / "local", tmp_path / "ranks"
    shutil.copytree(first, local)
    shutil.copytree(first, ranks)
    y = train(_cfg(stopping_model_dir, local, "train.steps=2", *common, env="ray-digits-v0"), resume=True)
    x = train(_cfg(stopping_model_dir, ranks, "train.steps=2", *common, "cluster.trainer_workers=2",
                   env="ray-digits-v0"), resume=True)
    x, y = x["history"][0], y["history"][0]
    assert y["critic/value_mean"] != 0.0  # the critic trained at step 1: its values feed step 2's advantages
    for key in ("loss", "grad_norm", "critic/loss", "critic/grad_norm", "critic/value_mean", "critic/value_error"):
        assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-6), key
    a, b = _state(local)["critic"], _state(ranks)["critic"]
    assert sorted(a["model"]) == sorted(b["model"]) and "value_head.weight" in a["model"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-4, rtol=0)
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"]) and a["scheduler"] == b["scheduler"]
    exported = load_critic(str(ranks / "final" / "critic"), dtype=torch.float32, device="cpu",
                           attn_implementation=register_varlen_attention()).state_dict()
    assert all(torch.equal(exported[k], b["model"][k]) for k in exported)
