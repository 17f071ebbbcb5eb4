"""GPU: the FlashAttention varlen path gives the same packed logprobs as per-sequence attention.

Runs on the device machine (`pytest -m gpu tests/trainer/test_attention_gpu.py`); skipped in CI.
"""

from __future__ import annotations

import pytest
import torch

from agentrl.trainer.actor import token_logprobs
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.packing import pack_sequences

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2ForCausalLM(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_varlen_cuda_matches_per_sequence_sdpa(dtype, atol):
    model = _model(dtype)
    torch.manual_seed(1)
    lengths = [700, 129, 1500, 33, 2048]
    seqs = [torch.randint(0, 4096, (n,)).tolist() for n in lengths]
    packed = pack_sequences(seqs, device="cuda")
    with torch.no_grad():
        model.config._attn_implementation = register_varlen_attention()
        fast, _ = token_logprobs(model, packed, chunk_size=1024)
        model.config._attn_implementation = "sdpa"
        ref = []
        for s in seqs:
            logits = model(torch.tensor([s], device="cuda")).logits[0].float()
            lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(s[1:], device="cuda").unsqueeze(-1))
            ref.append(torch.cat([lp.squeeze(-1), lp.new_zeros(1)]))
    diff = (fast - torch.cat(ref)).abs()
    print(f"{dtype}: max abs logprob diff {diff.max().item():.4g}, mean {diff.mean().item():.3g}")
    assert diff.max().item() < atol
