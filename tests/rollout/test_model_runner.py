"""The engine's forward pass (`ModelRunner`) on paths the short conformance prompts do not reach.

A step of at least `_SPLIT_GATED_ROWS` tokens runs the MLP as two matmuls (CPU); its logprobs must
still match a plain Hugging Face forward.
"""

from __future__ import annotations

import asyncio
import random

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.rollout.backends.embedded import model_runner
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams


def test_large_prefill_step_matches_hf_forward():
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=256, max_position_embeddings=1024)
    hf = Qwen2ForCausalLM(cfg).eval()
    rng = random.Random(0)
    # Two prompts in one prefill step: together past the threshold of the split MLP.
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (model_runner._SPLIT_GATED_ROWS, 40)]
    engine = EmbeddedEngine(hf, max_model_len=1024)

    async def go():
        sp = SamplingParams(temperature=0.0, max_tokens=3)
        return await asyncio.gather(*(engine.generate(p, sp) for p in prompts))

    for p, out in zip(prompts, asyncio.run(go())):
        ids = torch.tensor([p + list(out.token_ids)])
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0, len(p) - 1:-1].float(), -1)  # [3, V]
        assert list(out.token_ids) == ref.argmax(-1).tolist()
        got = torch.tensor(out.logprobs)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
