"""Training-loop options end to end on CPU: LoRA, KL to the reference, TIS, dynamic sampling, per-turn
credit assignment (turn_rloo, PPO with a critic)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from agentrl.config import load_config
from agentrl.errors import ConfigError
from agentrl.driver.collect import collect
from agentrl.driver.loop import train
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.trainer_side import TrainerSide

# Registers digits-v0 (reward = share of digits in the reply: varies within a group even untrained).
_spec = importlib.util.spec_from_file_location("agentrl_test_run_train", Path(__file__).with_name("run_train.py"))
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


def _cfg(model_dir: str, run_dir: Path, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}", "env.id=digits-v0", "rollout.prompts_per_step=3", "rollout.samples_per_prompt=3",
        "rollout.max_tokens_per_turn=16", "rollout.max_turns=1", "rollout.max_total_tokens=64", "train.steps=2",
        "optim.lr=0.01", "eval.num_tasks=0", "train.checkpoint_every=0", f"run_dir={run_dir}", *extra])


def test_lora_trains_adapters_and_exports_a_plain_merged_model(stopping_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(_cfg(stopping_model_dir, tmp_path, "model.lora.rank=4", "model.lora.alpha=8"))
    assert all(math.isfinite(m["loss"]) for m in result["history"])
    base = AutoModelForCausalLM.from_pretrained(stopping_model_dir).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()  # no peft needed
    assert sorted(exported) == sorted(base)
    changed = {k for k in base if not torch.equal(base[k], exported[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # adapted linears only
    # Oracle: peft's own merge of the adapters saved in the last checkpoint equals our export.
    from agentrl.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from agentrl.trainer.policy import load_policy

    state, _ = load_checkpoint(latest_checkpoint(tmp_path))
    model = load_policy(stopping_model_dir, dtype=torch.float32, device="cpu", attn_implementation="sdpa",
                        lora_rank=4, lora_alpha=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"))
    model.load_state_dict(state["policy"])
    assert isinstance(model, PeftModel)
    merged = model.merge_and_unload().state_dict()
    for k in base:
        torch.testing.assert_close(merged[k], exported[k], atol=1e-6, rtol=1e-6)


def test_kl_to_reference_as_loss_and_as_reward(stopping_model_dir, tmp_path):
    hist = train(_cfg(stopping_model_dir, tmp_path / "loss", "algorithm.kl_coef=0.5"))["history"]
    assert hist[0]["kl_ref"] == 0.0  # step 1: the policy is the reference, token for token
    assert hist[1]["kl_ref"] > 0.0  # after one update it has moved
    hist = train(_cfg(stopping_model_dir, tmp_path / "reward", "algorithm.kl_coef=0.5",
                      "algorithm.kl_mode=reward"))["history"]
    assert all(math.isfinite(m["loss"]) and "kl_ref" not in m for m in hist)


def test_tis_weights_are_reported_and_near_one_on_cpu(stopping_model_dir, tmp_path):
    hist = train(_cfg(stopping_model_dir, tmp_path, "algorithm.old_logprobs=recompute", "algorithm.tis=token"))["history"]
    for m in hist:  # engine and trainer both fp32 on CPU: pi_old / pi_rollout is 1 up to float error
        assert m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3) and m["tis_clip_frac"] == 0.0


def test_tis_needs_recomputed_old_logprobs(stopping_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="old_logprobs=recompute"):
        _cfg(stopping_model_dir, tmp_path, "algorithm.tis=token")


def test_dynamic_sampling_keeps_only_groups_with_a_signal(stopping_model_dir, tmp_path):
    cfg = _cfg(stopping_model_dir, tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3")
    s = RolloutSide.open(cfg)
    try:
        kept, metrics = collect(s, step=0)
    finally:
        s.close()
    assert 1 <= metrics["sampling_rounds"] <= 3
    groups: dict[int, set[float]] = {}
    for t in kept:
        groups.setdefault(t.group_id, set()).add(t.reward)
    assert groups and all(len(rewards) > 1 for rewards in groups.values())
    assert metrics["kept_groups"] == len(groups) <= 3 and len(kept) <= 9


def test_gradient_checkpointing_changes_memory_not_results(stopping_model_dir, tmp_path):
    plain = train(_cfg(stopping_model_dir, tmp_path / "a", "train.steps=1"))["history"][0]
    ckpt = train(_cfg(stopping_model_dir, tmp_path / "b", "train.steps=1", "train.gradient_checkpointing=true"))
    for key in ("loss", "grad_norm", "entropy"):
        assert ckpt["history"][0][key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7)


def test_lora_on_missing_modules_is_a_config_error(stopping_model_dir, tmp_path):
    cfg = _cfg(stopping_model_dir, tmp_path, "model.lora.rank=4", "model.lora.target_modules=[no_such_proj]")
    with pytest.raises(ConfigError, match="model.lora"):
        TrainerSide.open(cfg, cfg.model.path)


@pytest.mark.parametrize("advantage", ["turn_rloo", "gae"])
def test_per_turn_estimators_train_on_a_multi_turn_env(stopping_model_dir, tmp_path, advantage):
    """Three rewarded turns per episode: the turn-level estimators train the policy (and the critic)."""
    from transformers import AutoModelForCausalLM

    extra = ["env.id=digit-turns-v0", "rollout.max_turns=3", "rollout.max_total_tokens=200",
             f"algorithm.advantage={advantage}", "algorithm.kl_coef=0.1", "algorithm.kl_mode=reward"]
    extra += ["critic.lr=0.01"] if advantage == "gae" else []
    hist = train(_cfg(stopping_model_dir, tmp_path, *extra))["history"]
    assert max(m["turns_mean"] for m in hist) > 1.5  # episodes really have several turns
    assert all(math.isfinite(m["loss"]) and m["nonfinite"] == 0.0 for m in hist)
    assert max(m["grad_norm"] for m in hist) > 0
    if advantage == "gae":
        assert all(m["critic/loss"] > 0 and math.isfinite(m["critic/grad_norm"]) for m in hist)
        assert hist[1]["critic/value_mean"] != 0.0  # the critic moved off its zero head after step 1
    start = AutoModelForCausalLM.from_pretrained(stopping_model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_a_critic_path_without_a_model_is_a_config_error(stopping_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _cfg(stopping_model_dir, tmp_path, "algorithm.advantage=gae", f"critic.path={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="cannot load the critic from critic.path .*empty.*RUN_DIR/final/critic"):
        TrainerSide.open(cfg, cfg.model.path)
