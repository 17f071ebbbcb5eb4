"""Fused elementwise kernels of the engine's forward pass: residual add + RMSNorm, SiLU-and-mul.

A decode step of a small model is a chain of tiny kernels: unfused, RMSNorm alone is six
(cast, square, mean, rsqrt, scale, weight), about 28 kernels per layer in all. Inside a CUDA
graph each still costs ~2 us of GPU time however little it computes, which at 24 layers is most
of a decode step. These two Triton kernels bring a layer to about 14 kernels.

Rotary and the cache write are one more kernel, in `rotary.py`.

Each reproduces the roundings of the unfused PyTorch/Hugging Face code in half precision (an
intermediate that PyTorch stores in bf16 is rounded to bf16 here too), so the engine stays close
to what the trainer recomputes. Each public function runs the kernel on CUDA and the torch
reference elsewhere.

Letters: N tokens, H hidden size, I MLP width.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Torch references (CPU path, and what the GPU tests compare against).
# ----------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalise in float32, round to x's dtype, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_reference(x, delta, weight, eps):
    x = x if delta is None else x + delta
    return x, rms_norm_reference(x, weight, eps)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------

def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x + delta` (the residual stream) and its RMSNorm, in one pass.

    Args:
        x: [N, H] residual stream (contiguous).
        delta: [N, H] what a sub-layer adds, or None (then x is only normalised).
        weight: [H] norm weight.
        eps: norm epsilon.

    Returns:
        (new residual [N, H], normalised [N, H]); the first is `x` itself when `delta` is None.
    """
    if not x.is_cuda or x.shape[0] == 0:
        return add_rms_norm_reference(x, delta, weight, eps)
    N, H = x.shape
    new_x = x if delta is None else torch.empty_like(x)
    out = torch.empty_like(x)
    _kernels().add_rms_norm[(N,)](
        x, x if delta is None else delta, weight, new_x, out, H, eps,
        HAS_DELTA=delta is not None, BLOCK=_next_pow2(H), num_warps=4 if H <= 2048 else 8)
    return new_x, out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for gate_up = [gate | up] of shape [N, 2I]; returns [N, I]."""
    if not gate_up.is_cuda or gate_up.shape[0] == 0:
        return silu_and_mul_reference(gate_up)
    N, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(N, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _kernels().silu_and_mul[(N, -(-inter // block))](gate_up, out, inter, gate_up.stride(0), BLOCK=block,
                                                      num_warps=4)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _kernels():
    """Compile-on-first-use kernels (Triton is imported here so that CPU imports stay light)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm(x_ptr, d_ptr, w_ptr, new_x_ptr, out_ptr, H, eps,
                     HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * H + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # the add rounds to the model dtype
            tl.store(new_x_ptr + row * H + offs, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
        h = (xf * rstd).to(x.dtype).to(tl.float32)  # HF rounds before the weight multiply
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + offs, (w * h).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def silu_and_mul(gu_ptr, out_ptr, inter, stride_n, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < inter
        g = tl.load(gu_ptr + t * stride_n + offs, mask=m, other=0.0)
        u = tl.load(gu_ptr + t * stride_n + inter + offs, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu rounds to the model dtype
        tl.store(out_ptr + t * inter + offs, (s * u).to(g.dtype), mask=m)

    return types.SimpleNamespace(add_rms_norm=add_rms_norm, silu_and_mul=silu_and_mul)
