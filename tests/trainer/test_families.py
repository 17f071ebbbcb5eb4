"""The trainer agrees with transformers on every model family: packed varlen logprobs (and their
gradients) equal an unpacked eager forward, and the load-time check refuses a model whose logits
the packed path would get wrong.

The reference is transformers itself: `model(ids).logits` per sequence with eager attention, which
applies each family's own sliding windows, attention and final logit caps and logit scaling.
"""

from __future__ import annotations

import pytest
import torch

from agentrl.errors import TrainerError
from agentrl.trainer import actor
from agentrl.trainer.actor import token_logprobs
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.packing import pack_sequences
from agentrl.trainer.policy import check_packed_forward
from tests.model_families import ALL, build_family_model

SEQ_LENS = (5, 23, 1, 12)  # 23 and 12 are longer than the families' test sliding windows


def _packed_model(family: str) -> torch.nn.Module:
    model = build_family_model(family, seed=0)
    model.set_attn_implementation(register_varlen_attention())
    return model


def _reference(model: torch.nn.Module, seqs: list[list[int]], temperature: float):
    """Per sequence: eager HF forward, log_softmax(logits / T). Returns (logp of next tokens, entropy) per seq."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = []
        for s in seqs:
            logp = torch.log_softmax(model(torch.tensor([s])).logits[0].float() / temperature, -1)  # [n, V]
            lp = torch.zeros(len(s))
            lp[:-1] = logp[:-1].gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
            ent = torch.zeros(len(s))
            ent[:-1] = -(logp.exp() * logp).sum(-1)[:-1]
            out.append((lp, ent))
        return out
    finally:
        model.set_attn_implementation(impl)


def _seqs(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in SEQ_LENS]


@pytest.mark.parametrize("family", ALL)
def test_packed_logprobs_equal_hf_forward(family):
    model = _packed_model(family)
    seqs = _seqs(model.config.vocab_size)
    with torch.no_grad():
        lp, ent = token_logprobs(model, pack_sequences(seqs), temperature=0.7, chunk_size=7)
        ref = _reference(model, seqs, 0.7)
    offset = 0
    for s, (want_lp, want_ent) in zip(seqs, ref):
        torch.testing.assert_close(lp[offset:offset + len(s)], want_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[offset:offset + len(s)], want_ent, atol=1e-5, rtol=0)
        offset += len(s)


@pytest.mark.parametrize("family", ALL)
def test_packed_gradients_equal_hf_autograd(family):
    """The chunked head's closed-form backward (with the family's logit scale and cap) against autograd."""
    model = _packed_model(family)
    seqs = _seqs(model.config.vocab_size)
    lp, ent = token_logprobs(model, pack_sequences(seqs), temperature=0.7, chunk_size=7)
    (lp.sum() + 0.3 * ent.sum()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(lp_.sum() + 0.3 * ent_.sum() for lp_, ent_ in _reference(model, seqs, 0.7))
    total.backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert ((fast[name] - p.grad).abs().max() / scale).item() < 1e-4, name


def test_load_time_check_refuses_a_model_whose_logits_the_packed_path_gets_wrong(monkeypatch):
    """Granite divides its logits by `logits_scaling`; with that transform switched off (what an
    unknown family's transform would look like) the check at load must refuse the model."""
    model = _packed_model("granite")
    assert check_packed_forward(model) < 1e-4
    monkeypatch.setattr(actor, "logit_transform", lambda config: actor.LogitTransform())
    with pytest.raises(TrainerError, match="differs from transformers' own"):
        check_packed_forward(model)


def test_unknown_logit_option_is_refused():
    model = _packed_model("llama")
    model.config.logit_scale = 0.5  # Cohere-style scaling the trainer does not implement
    with pytest.raises(TrainerError, match="logit_scale"):
        token_logprobs(model, pack_sequences([[1, 2, 3]]))


def test_unknown_attention_option_is_refused():
    """An attention option that changes results (here: attention sinks) is an error, not ignored."""
    from agentrl.trainer.attention import _hf_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(TrainerError, match="s_aux"):
        _hf_attention(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]), s_aux=torch.zeros(2))
