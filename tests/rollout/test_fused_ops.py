"""The engine's fused Triton kernels (add + RMSNorm, SiLU-and-mul) against their torch references.

GPU-only (`gpu` marker); on CPU the public functions are the references themselves. In bf16 the
kernels round where the unfused torch code rounds, so they may differ from it only by the
order of a float32 sum: at most one bf16 step (2**-7 relative) on a few elements.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from agentrl.rollout.backends.embedded.kernels import fused_ops as fo  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rel = 1e-6 if dtype == torch.float32 else 2.0**-7
    err = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)).max().item()
    mismatch = (got != ref).float().mean().item()
    assert err <= rel * 1.01, f"max relative error {err:.2e}"
    assert dtype == torch.float32 or mismatch < 0.02, f"{mismatch:.1%} of elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(dtype, with_delta):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 896, device="cuda", generator=g).to(dtype)
    d = torch.randn(37, 896, device="cuda", generator=g).to(dtype) if with_delta else None
    w = (1 + 0.1 * torch.randn(896, device="cuda", generator=g)).to(dtype)
    nx, h = fo.add_rms_norm(x, d, w, 1e-6)
    rx, rh = fo.add_rms_norm_reference(x, d, w, 1e-6)
    assert torch.equal(nx, rx)  # one rounded add: exact
    close(h, rh, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    gu = torch.randn(23, 2 * 4864, device="cuda", generator=g).to(dtype)
    close(fo.silu_and_mul(gu), fo.silu_and_mul_reference(gu), dtype)
