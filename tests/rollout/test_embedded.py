"""The built-in engine's own behaviour: batching, errors, sleep/wake, weight versions, CPU attention.

Backend-independent behaviour (greedy == HF, logprobs == trainer, stops, seeds, abort, prefix
reuse) is in test_conformance.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.attention import SdpaPagedAttention
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.backends.embedded.kernels import paged_decode_attention_reference, paged_prefill_attention_reference
from agentrl.rollout.backends.embedded.scheduler import Chunk, Sequence, StepPlan
from agentrl.rollout.backends.embedded.step_inputs import build_step_inputs
from agentrl.rollout.engine import SamplingParams


def _prompts(tokenizer):
    texts = ["What is 12 times 13 plus 5?", "A shop has 40 boxes.", "Ann buys 3 packs of 9 stickers and finds 2 more."]
    return [tokenizer.encode(t) for t in texts]


async def _gen_all(engine, prompts, sampling):
    return await asyncio.gather(*(engine.generate(p, sampling) for p in prompts))


def test_concurrent_requests_join_one_batch(tiny_model_dir, tokenizer):
    engine = EmbeddedEngine(tiny_model_dir)
    outs = asyncio.run(_gen_all(engine, _prompts(tokenizer), SamplingParams(temperature=0.0, max_tokens=16)))
    assert engine.stats.batches == 1  # three different-length prompts admitted in one step
    assert engine.stats.extra["steps"] == 16  # one prefill step (which samples the first token) + 15 decodes
    assert engine.stats.generated_tokens == 48 and all(len(o.token_ids) == 16 for o in outs)


def test_late_requests_join_a_running_batch(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir)

    async def go():
        long = asyncio.ensure_future(engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=200)))
        while engine.stats.generated_tokens < 5:
            await asyncio.sleep(0.01)
        short = await engine.generate([8, 9], SamplingParams(temperature=0.0, max_tokens=4))
        assert not long.done()  # the short request joined and left while the long one kept decoding
        return short, await long

    short, long = asyncio.run(go())
    assert len(short.token_ids) == 4 and len(long.token_ids) == 200
    assert engine.stats.batches == 2 and engine.stats.extra["steps"] < 204


def test_bad_requests_raise_engine_error(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=32)
    with pytest.raises(EngineError, match="empty"):
        asyncio.run(engine.generate([], SamplingParams()))
    with pytest.raises(EngineError, match="max_model_len"):
        asyncio.run(engine.generate([1] * 40, SamplingParams()))
    with pytest.raises(EngineError, match="token ids"):
        asyncio.run(engine.generate([1, 10**6], SamplingParams()))
    with pytest.raises(EngineError, match="top_p"):
        asyncio.run(engine.generate([1, 2], SamplingParams(top_p=0.0)))
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(EngineError, match="temperature"):
            asyncio.run(engine.generate([1, 2], SamplingParams(temperature=bad)))


def test_prompt_longer_than_the_kv_budget_is_rejected(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, kv_cache_tokens=64, max_model_len=1024)
    with pytest.raises(EngineError, match="KV blocks"):
        asyncio.run(engine.generate(list(range(1, 100)), SamplingParams(max_tokens=4)))
    # A prompt that fits gets a response cut at the budget instead of running out of blocks.
    out = asyncio.run(engine.generate(list(range(1, 40)), SamplingParams(max_tokens=100)))
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 39


def test_stop_strings_without_a_tokenizer_raise(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = EmbeddedEngine(model)  # a loaded model: no tokenizer to decode stop strings with
    with pytest.raises(EngineError, match="tokenizer"):
        asyncio.run(engine.generate([1, 2, 3], SamplingParams(stop=("x",))))


def test_sleep_frees_the_cache_and_refuses_work_until_wake(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir)
    a = asyncio.run(engine.generate([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=6)))
    assert engine._cache is not None
    engine.sleep(level=2)
    assert engine._cache is None
    with pytest.raises(EngineError, match="asleep"):
        asyncio.run(engine.generate([4, 5, 6], SamplingParams(max_tokens=6)))
    engine.wake()
    b = asyncio.run(engine.generate([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=6)))
    assert a.token_ids == b.token_ids


def test_sleep_aborts_requests_in_flight(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=8192)

    async def go():
        task = asyncio.ensure_future(engine.generate([4, 5, 6], SamplingParams(max_tokens=5000)))
        while engine.stats.generated_tokens < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.sleep)
        return await task

    out = asyncio.run(go())
    assert out.finish_reason == "abort" and 3 <= len(out.token_ids) < 5000


def test_weight_update_mid_request_is_recorded_per_token(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=8192)
    sd = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()

    async def go():
        # Long enough never to finish on its own: the update lands mid-request however loaded the
        # machine is, and the request is aborted once a few tokens came from the new weights.
        task = asyncio.ensure_future(engine.generate([4, 5, 6], SamplingParams(max_tokens=7000)))
        while engine.stats.generated_tokens < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.update_weights, sd, 3)
        after = engine.stats.generated_tokens
        while engine.stats.generated_tokens < after + 3:
            await asyncio.sleep(0.01)
        engine.abort()
        return await task

    out = asyncio.run(go())
    versions = out.token_weight_versions
    assert out.finish_reason == "abort" and len(versions) == len(out.token_ids) < 7000
    assert versions[0] == 0 and versions[-1] == 3
    assert list(versions) == sorted(versions) and out.weight_version == 0  # the oldest weights that sampled


def test_cancelled_requests_are_dropped(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=8192)

    async def go():
        task = asyncio.ensure_future(engine.generate([4, 5, 6], SamplingParams(max_tokens=5000)))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.2)
        return await engine.generate([7, 8], SamplingParams(max_tokens=2))

    assert len(asyncio.run(go()).token_ids) == 2
    assert engine._sched.alloc.num_used == 0  # the cancelled request gave its blocks back


def test_sdpa_attention_matches_the_reference_on_a_mixed_step():
    # Two decodes and two prefill chunks (one with a cached prefix) over shuffled blocks, compared
    # with the kernels' float32 torch references on the same cache layout.
    torch.manual_seed(0)
    P, Hkv, Hq, D = 4, 2, 4, 8
    table = torch.randperm(63).add(1).numpy().reshape(7, 9).astype("int32")
    k_cache, v_cache = torch.randn(64, P, Hkv, D), torch.randn(64, P, Hkv, D)
    seqs = [Sequence(i, list(range(n)), max_new=1, row=i) for i, n in enumerate([9, 13, 11, 6])]
    plan = StepPlan([Chunk(seqs[0], 8, 1, True), Chunk(seqs[1], 12, 1, True), Chunk(seqs[2], 4, 7, True),
                     Chunk(seqs[3], 0, 6, True)])
    inp = build_step_inputs(plan, table, P, torch.device("cpu"))
    q = torch.randn(inp.input_ids.shape[0], Hq, D)
    got = SdpaPagedAttention()(q, k_cache, v_cache, inp.meta, D ** -0.5)
    m = inp.meta
    dec = paged_decode_attention_reference(q[:2], k_cache, v_cache, m.decode_block_table, m.decode_seq_lens, D ** -0.5)
    pre = paged_prefill_attention_reference(q[2:], k_cache, v_cache, m.prefill_block_table, m.prefill_cu_q,
                                            m.prefill_seq_lens, D ** -0.5)
    torch.testing.assert_close(got, torch.cat([dec, pre]), atol=1e-5, rtol=1e-5)


def test_close_waits_for_the_engine_thread_and_the_engine_serves_again(tiny_model_dir):
    """`close()` returns only once the engine thread has exited (a thread still unwinding at
    interpreter exit aborts the process); a later request starts a new one."""
    engine = EmbeddedEngine(tiny_model_dir, max_model_len=8192)

    async def go():
        task = asyncio.ensure_future(engine.generate([4, 5, 6], SamplingParams(max_tokens=5000)))
        while engine.stats.generated_tokens < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.close)
        return await task

    out = asyncio.run(go())
    assert out.finish_reason == "abort"
    assert engine._last_thread is not None and not engine._last_thread.is_alive()
    again = asyncio.run(engine.generate([4, 5, 6], SamplingParams(max_tokens=3)))
    assert again.finish_reason == "length" and len(again.token_ids) == 3
    engine.close()
    assert not engine._last_thread.is_alive()
