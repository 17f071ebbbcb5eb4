"""Load: 2,000 concurrent requests against a KV budget that holds about a tenth of them at once."""

from __future__ import annotations

import asyncio
import random

from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams

REQUESTS = 2000


def test_two_thousand_requests_on_a_tenth_of_the_memory(tiny_model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(6, 20))] for _ in range(REQUESTS)]
    max_new = [rng.randint(4, 28) for _ in range(REQUESTS)]
    # A request holds at most 20 + 28 = 48 tokens: 3 blocks of 16. A tenth of the requests at their
    # largest is 200 * 48 = 9,600 tokens = 600 blocks. Admission only reserves a prompt's blocks, so
    # decodes that grow into new blocks fill the pool and force preemptions.
    engine = EmbeddedEngine(tiny_model_dir, kv_cache_tokens=9600, max_batch_size=512)

    async def go():
        return await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=n, seed=i))
                                      for i, (p, n) in enumerate(zip(prompts, max_new))))

    outs = asyncio.run(go())
    assert len(outs) == REQUESTS
    assert all(o.finish_reason == "length" and len(o.token_ids) == n for o, n in zip(outs, max_new))
    extra = engine.stats.extra
    assert extra["kv_blocks"] == 600 and engine._cache.k[0].shape[0] == 601  # the pool never grows
    assert 0.9 * extra["kv_blocks"] <= extra["kv_blocks_peak"] <= extra["kv_blocks"]  # the budget was what bound
    assert extra["preemptions"] > 0  # growing decodes ran the pool dry; preempted requests still finished
    assert engine.stats.requests == REQUESTS and engine.stats.generated_tokens == sum(max_new)
    assert engine._sched.alloc.num_used == 0 and not engine._sched.has_work
    # KV tokens per GiB, as reported, from the cache tensors themselves (all layers' K and V).
    cache = engine._cache
    per_token = sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v]) // (601 * 16)
    assert extra["kv_tokens_per_gib"] == 2**30 // per_token
