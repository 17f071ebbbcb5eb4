"""Trainer-side logprobs: packed == unpacked, and == the engine's sampled logprobs (CPU fp32)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentrl.envs import make
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import SamplingParams
from agentrl.trainer.actor import shift_to_next_token, token_logprobs
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.packing import pack_by_token_budget, pack_sequences


def _policy(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=register_varlen_attention()).eval()


def test_packed_equals_unpacked(tiny_model_dir):
    torch.manual_seed(0)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 17, 1, 9)]
    model = _policy(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        packed_lp, packed_ent = token_logprobs(model, pack_sequences(seqs), chunk_size=7)
        offset = 0
        for s in seqs:
            # Reference: plain HF forward of one sequence, eager attention, full logits.
            logits = ref(torch.tensor([s])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expect = torch.zeros(len(s))
            expect[:-1] = logp[:-1].gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
            ent = torch.zeros(len(s))
            ent[:-1] = -(logp.exp() * logp).sum(-1)[:-1]
            torch.testing.assert_close(packed_lp[offset:offset + len(s)], expect, atol=1e-5, rtol=0)
            torch.testing.assert_close(packed_ent[offset:offset + len(s)], ent, atol=1e-5, rtol=0)
            offset += len(s)


def test_rollout_logprobs_match_trainer(tiny_model_dir, tokenizer):
    env = make("calculator-v0")
    renderer = ChatRenderer(tokenizer, env.tool_schemas())
    engine = EmbeddedEngine(tiny_model_dir)
    torch.manual_seed(1)
    trajs = asyncio.run(run_episodes(engine, EnvPool(lambda: make("calculator-v0")), renderer,
                                     SamplingParams(temperature=0.7, max_tokens=24), EpisodeLimits(3, 400),
                                     [EpisodeSpec(seed=i) for i in range(8)]))
    model = _policy(tiny_model_dir)
    worst = 0.0
    with torch.no_grad():
        for idx in pack_by_token_budget([len(t.token_ids) for t in trajs], 600):
            packed = pack_sequences([trajs[i].token_ids for i in idx])
            logp, _ = token_logprobs(model, packed, temperature=0.7)
            mask = packed.pack([shift_to_next_token(list(trajs[i].loss_mask)) for i in idx]).bool()
            rollout = packed.pack([shift_to_next_token(list(trajs[i].rollout_logprobs)) for i in idx])
            assert mask.sum() > 0
            worst = max(worst, float((logp - rollout)[mask].abs().max()))
    assert worst < 1e-4, worst


def test_pack_by_token_budget_first_fit_decreasing():
    # Sorted by length: 9(i2) 6(i0) 5(i3) 4(i1) 2(i4). Budget 10: 9 opens bin A (room 1); 6 opens B (room 4);
    # 5 opens C (room 5); 4 fits B (room 0); 2 fits C (room 3).
    assert pack_by_token_budget([6, 4, 9, 5, 2], 10) == [[2], [0, 1], [3, 4]]
    assert pack_by_token_budget([12], 10) == [[0]]  # too long for the budget: alone in its bin


def test_packing_positions_restart_and_no_padding():
    p = pack_sequences([[1, 2, 3], [4, 5]])
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 5]
    targets, valid = p.next_token_targets()
    assert targets.tolist() == [2, 3, 0, 5, 0] and valid.tolist() == [True, True, False, True, False]
    assert p.to_padded(torch.arange(5.0)).tolist() == [[0, 1, 2], [3, 4, 0]]


@pytest.mark.parametrize("temperature,with_bias", [(1.0, False), (0.7, True)])
def test_closed_form_backward_matches_autograd(temperature, with_bias):
    """The chunked closed-form backward gives autograd's gradients of log_softmax over full logits."""
    from agentrl.trainer.actor import _ChunkLogprobs

    torch.manual_seed(0)
    N, E, V = 37, 16, 53  # noqa: N806 - shape letters
    hidden = torch.randn(N, E, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, E, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, V, (N,))
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)

    # Reference: the whole [N, V] logits through autograd.
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    logp_all = torch.log_softmax(logits, -1)
    ref_lp = logp_all.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    ref_grads = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), inputs, retain_graph=True)

    parts = [_ChunkLogprobs.apply(hidden[s:s + 10], weight, bias, targets[s:s + 10], 1 / temperature, False)
             for s in range(0, N, 10)]
    lp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)
    grads = torch.autograd.grad((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()
    # Only the logprob used: the entropy term drops out of the backward.
    lp_only = torch.autograd.grad(torch.cat([_ChunkLogprobs.apply(hidden, weight, bias, targets, 1 / temperature,
                                                                  False)[0]]).double().mul(g_lp).sum(), inputs)
    ref_only = torch.autograd.grad((ref_lp * g_lp).sum(), inputs)
    for g, r in zip(lp_only, ref_only):
        assert torch.allclose(g, r, atol=1e-5)


def test_backward_under_autocast_runs_in_the_forward_dtype():
    """Float32 master weights under bf16 autocast: the backward's recomputation and gradient matmuls
    run in bf16 as the forward did (autocast is off during backward), and the gradients come back
    float32 and close to autograd's through the same bf16 projection."""
    from torch.profiler import profile

    from agentrl.trainer.actor import _ChunkLogprobs

    torch.manual_seed(0)
    N, E, V = 24, 16, 40  # noqa: N806 - shape letters
    hidden = torch.randn(N, E, requires_grad=True)
    weight = torch.randn(V, E, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = _ChunkLogprobs.apply(hidden, weight, bias, targets, 1.0, False)
        logits = torch.nn.functional.linear(hidden, weight, bias)  # the reference: same bf16 projection
    logp_all = torch.log_softmax(logits.float(), -1)
    ref = logp_all.gather(-1, targets[:, None])[:, 0].sum() - (logp_all.exp() * logp_all).sum()
    ref_grads = torch.autograd.grad(ref, [hidden, weight, bias])
    with profile(record_shapes=True) as prof:
        grads = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight, bias])
    matmuls = [tuple(e.input_dtypes[:2]) for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert len(matmuls) >= 3, matmuls  # recomputed logits, d hidden, d weight
    assert all(set(d) == {"c10::BFloat16"} for d in matmuls), matmuls
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert torch.allclose(g, r, rtol=0.05, atol=0.05 * r.abs().max().item()), (g - r).abs().max()
