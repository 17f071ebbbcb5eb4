"""Tests of agentrl/trainer/critic.py: the value model's packed values against transformers' own forward,
the update's exactness over micro-batches, a critic that learns, GAE with a trained critic against the
slow reference, and saving/loading."""

from __future__ import annotations

import pytest
import torch
from credit_reference import multi_turn_batch, slow_gae_row, to_next_token, token_layout_rewards
from transformers import AutoModel, AutoModelForCausalLM

from agentrl.errors import TrainerError
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.critic import compute_values, critic_update, load_critic, save_critic
from agentrl.trainer.update import compute_gae


def _critic(path: str):
    return load_critic(path, dtype=torch.float32, device="cpu", attn_implementation=register_varlen_attention())


def _eager_values(critic, ids: list[int]) -> list[float]:
    """Token layout, by transformers' own eager forward of the one row: token i's value is the head
    on the hidden state at i - 1 (the state before token i); token 0 has none."""
    eager = AutoModel.from_pretrained(critic.config.name_or_path, attn_implementation="eager").eval()
    eager.load_state_dict(critic.backbone.state_dict())
    with torch.no_grad():
        hidden = eager(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [n, E]
        values = critic.value_head(hidden).squeeze(-1)  # [n]
    return [0.0] + values[:-1].tolist()


def _random_head(critic, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        critic.value_head.weight.copy_(torch.randn(critic.value_head.weight.shape, generator=gen) * 0.3)
        critic.value_head.bias.fill_(0.1)


def _with_targets(batch: TrainBatch, seed: int = 1) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch.mask.shape, generator=gen) * 0.1 * batch.mask
    returns = (torch.randn(batch.mask.shape, generator=gen) + 1.0) * batch.mask
    return batch.with_(values=values, returns=returns)


def test_starts_from_the_policys_backbone_with_a_zero_head(tiny_model_dir):
    critic = _critic(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    own = critic.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in policy.model.state_dict().items())
    batch, _ = multi_turn_batch()
    assert compute_values(critic, batch, micro_batch_tokens=64).abs().sum() == 0


def test_packed_values_equal_transformers_per_row(tiny_model_dir):
    critic = _critic(tiny_model_dir)
    _random_head(critic)
    batch, masks = multi_turn_batch()
    values = compute_values(critic, batch, micro_batch_tokens=20)  # several micro-batches
    width = batch.token_ids.shape[1]
    want = to_next_token([_eager_values(critic, batch.token_ids[b, :len(m)].tolist()) for b, m in enumerate(masks)],
                         width).float() * batch.mask
    torch.testing.assert_close(values, want, atol=1e-5, rtol=1e-5)
    assert (values[batch.mask == 0] == 0).all() and values.abs().sum() > 0


def test_update_is_the_same_over_any_micro_batching(tiny_model_dir):
    """Token-mean over the mini-batch: one pass over all rows and four small passes give one gradient."""
    batch = _with_targets(multi_turn_batch()[0])
    states = []
    for budget in (4096, 16):
        critic = _critic(tiny_model_dir)
        _random_head(critic)
        opt = torch.optim.SGD(critic.parameters(), lr=0.5)
        metrics = critic_update(critic, opt, batch, clip=0.3, micro_batch_tokens=budget, grad_clip=1e9)
        states.append((metrics, critic.state_dict()))
    (m1, s1), (m2, s2) = states
    assert m1["critic/loss"] == pytest.approx(m2["critic/loss"], rel=1e-5) and m1["critic/loss"] > 0
    assert m1["critic/grad_norm"] == pytest.approx(m2["critic/grad_norm"], rel=1e-5)
    assert max(float((s1[k] - s2[k]).abs().max()) for k in s1) < 1e-5  # SGD: lr x (gradient difference)


def test_critic_learns_the_returns(tiny_model_dir):
    """Regressing on returns that differ by row for a few steps: the error falls and the backbone moves."""
    critic = _critic(tiny_model_dir)
    batch, _ = multi_turn_batch()
    returns = batch.mask * torch.tensor([1.0, -0.5, 0.3, 2.0])[:, None]  # [B, T]
    batch = batch.with_(returns=returns, values=torch.zeros_like(returns))
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    errors = []
    for _ in range(10):
        values = compute_values(critic, batch, 64)
        metrics = critic_update(critic, opt, batch.with_(values=values), clip=10.0, micro_batch_tokens=64,
                                grad_clip=1.0)
        errors.append(metrics["critic/value_error"])
        assert metrics["critic/nonfinite"] == 0.0
    assert errors[-1] < 0.5 * errors[0], errors
    assert any(not torch.equal(start[k], v) for k, v in critic.state_dict().items() if k.startswith("backbone."))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_with_a_trained_critic_matches_the_slow_reference(tiny_model_dir, gamma, lam):
    """Train the critic a few steps on the multi-turn rows, then GAE from its packed values equals the
    token-by-token reference fed with transformers' eager values (observation tokens skipped, each
    turn's reward on its last token)."""
    critic = _critic(tiny_model_dir)
    batch, masks = multi_turn_batch()
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    for _ in range(3):
        scored = compute_gae(batch, compute_values(critic, batch, 32), gamma, lam, whiten=False)
        critic_update(critic, opt, scored, clip=0.5, micro_batch_tokens=32, grad_clip=1.0)
    out = compute_gae(batch, compute_values(critic, batch, 32), gamma, lam, whiten=False)
    assert out.values.abs().sum() > 0  # trained: no longer the zero head
    values = [_eager_values(critic, batch.token_ids[b, :len(m)].tolist()) for b, m in enumerate(masks)]
    ref = [slow_gae_row(r, m, v, gamma, lam) for r, m, v in zip(token_layout_rewards(batch, masks), masks, values)]
    width = batch.token_ids.shape[1]
    torch.testing.assert_close(out.advantages, to_next_token([a for a, _ in ref], width).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.returns, to_next_token([r for _, r in ref], width).float(), atol=1e-4, rtol=1e-4)


def test_saved_critic_loads_with_its_head(tiny_model_dir, tmp_path):
    critic = _critic(tiny_model_dir)
    _random_head(critic, seed=4)
    save_critic(critic, tmp_path / "critic")
    again = _critic(str(tmp_path / "critic"))
    batch, _ = multi_turn_batch()
    assert torch.equal(compute_values(again, batch, 64), compute_values(critic, batch, 64))


def test_refuses_weights_of_another_shape(tiny_model_dir, tmp_path):
    from transformers import Qwen2Config, Qwen2Model

    other = Qwen2Model(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1))
    state = {k: v for k, v in other.state_dict().items() if "layers.0.mlp" not in k}  # half a model
    other.save_pretrained(tmp_path / "broken", state_dict=state)
    with pytest.raises(TrainerError, match="lack .* backbone tensors"):
        _critic(str(tmp_path / "broken"))
    with pytest.raises(TrainerError, match="needs the batch's values and returns"):
        critic_update(_critic(tiny_model_dir), None, multi_turn_batch()[0], clip=0.2, micro_batch_tokens=64,
                      grad_clip=1.0)
