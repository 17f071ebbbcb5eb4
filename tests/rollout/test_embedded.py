"""The built-in engine against Hugging Face `generate` and against the trainer's logprobs."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded import EmbeddedEngine, sample_tokens
from agentrl.rollout.engine import SamplingParams


def _prompts(tokenizer):
    texts = ["What is 12 times 13 plus 5?", "A shop has 40 boxes.", "Ann buys 3 packs of 9 stickers and finds 2 more."]
    return [tokenizer.encode(t) for t in texts]


async def _gen_all(engine, prompts, sampling):
    return await asyncio.gather(*(engine.generate(p, sampling) for p in prompts))


def test_greedy_matches_hf_generate(tiny_model_dir, tokenizer):
    prompts = _prompts(tokenizer)
    engine = EmbeddedEngine(tiny_model_dir)
    outs = asyncio.run(_gen_all(engine, prompts, SamplingParams(temperature=0.0, max_tokens=16)))
    assert engine.stats.batches == 1  # three different-length prompts, one left-padded batch
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        assert list(out.token_ids) == ref
        assert out.finish_reason == "length"


def test_stop_tokens_and_max_tokens(tiny_model_dir, tokenizer):
    engine = EmbeddedEngine(tiny_model_dir)
    p = _prompts(tokenizer)[0]
    greedy = asyncio.run(engine.generate(p, SamplingParams(temperature=0.0, max_tokens=8)))
    stop_at = greedy.token_ids[3]
    out = asyncio.run(engine.generate(p, SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(stop_at,))))
    first = greedy.token_ids.index(stop_at)
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)


def test_seeded_sampling_is_reproducible(tiny_model_dir, tokenizer):
    engine = EmbeddedEngine(tiny_model_dir)
    p = _prompts(tokenizer)[1]
    a = asyncio.run(engine.generate(p, SamplingParams(max_tokens=10, seed=5)))
    b = asyncio.run(engine.generate(p, SamplingParams(max_tokens=10, seed=5)))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_bad_requests_raise_engine_error(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=32)
    with pytest.raises(EngineError, match="empty"):
        asyncio.run(engine.generate([], SamplingParams()))
    with pytest.raises(EngineError, match="max_model_len"):
        asyncio.run(engine.generate([1] * 40, SamplingParams()))


def test_top_p_keeps_the_nucleus_only():
    # probs = softmax([2, 1, 0, -5]) = [.6623, .2436, .0896, .0045]; top_p=0.8 keeps the first two
    # (0.6623 < 0.8 so the second is needed; 0.9059 >= 0.8 so the third is not).
    logits = torch.tensor([[2.0, 1.0, 0.0, -5.0]]).repeat(2000, 1)
    toks, lps = sample_tokens(logits, torch.ones(2000), torch.full((2000,), 0.8), [None] * 2000)
    assert set(toks.tolist()) == {0, 1}
    full = torch.log_softmax(logits[0], -1)
    assert torch.allclose(lps, full[toks])  # reported logprobs are of the untruncated distribution
