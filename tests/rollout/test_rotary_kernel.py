"""The fused rotary + KV-write kernel against the engine's torch code: bit-identical q and cache.

GPU-only (`gpu` marker); on CPU `rope_write_kv` is the reference itself.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from agentrl.rollout.backends.embedded.kernels.rotary import rope_write_kv, rope_write_kv_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(14, 2, 64), (4, 4, 32), (16, 8, 128)])
def test_rope_write_kv_is_bit_identical_to_torch(dtype, heads):
    Hq, Hkv, D = heads
    torch.manual_seed(0)
    N, P, blocks, max_len = 37, 16, 20, 300
    dev = torch.device("cuda")
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, device=dev).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
    ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    sin_signed = torch.cat([-sin[:, : D // 2], sin[:, D // 2:]], -1).contiguous()
    positions = torch.randint(0, max_len, (N,), device=dev)
    slots = torch.randperm(blocks * P, device=dev)[:N]
    slots[::5] = -1  # padding rows: not written
    caches = [torch.zeros(blocks, P, Hkv, D, dtype=dtype, device=dev) for _ in range(4)]
    q = rope_write_kv(qkv, cos, sin_signed, positions, caches[0], caches[1], slots, Hq, Hkv)
    ref = rope_write_kv_reference(qkv, cos, sin_signed, positions, caches[2], caches[3], slots, Hq, Hkv)
    assert torch.equal(q, ref)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0 and caches[1].abs().sum() > 0
