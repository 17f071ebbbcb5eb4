"""Rotary embedding of q and k and the write of the new K/V into the paged cache, in one kernel.

Unfused, this is five kernels per layer (`qk * cos`, `roll`, `* sin`, `+`, then the cache write),
about 120 of a Qwen2-0.5B decode step's ~360, each costing a few microseconds of GPU time inside
a CUDA graph whatever little it computes.

The kernel rounds exactly where the torch code rounds: `x * cos` and `roll(x) * sin` are each
rounded to the model dtype before they are added, and floating-point contraction (a fused
multiply-add would skip a rounding) is switched off, so q and the cached K are bit-identical to
the torch path in every dtype (tests/rollout/test_rotary_kernel.py).

`sin_signed` is `[-sin_lo, sin_hi]` (see `model_runner.ModelRunner.bind`): with it,
`roll(x, D/2) * sin_signed == rotate_half(x) * sin`, Hugging Face's formula.

Letters: N tokens, Hq query heads, Hkv KV heads, D head dim, P block size.
"""

from __future__ import annotations

import functools

import torch


def rope_write_kv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                            num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Torch version (the engine's unfused path); returns q [N, Hq, D] and writes K/V at `slots` (>= 0)."""
    N = qkv.shape[0]
    D = cos.shape[-1]
    qk_width = (num_heads + num_kv_heads) * D
    c = cos.index_select(0, positions).unsqueeze(1)  # [N, 1, D]
    s = sin_signed.index_select(0, positions).unsqueeze(1)
    qk = qkv[:, :qk_width].view(N, num_heads + num_kv_heads, D)
    qk = qk * c + qk.roll(D // 2, -1) * s
    k, v = qk[:, num_heads:], qkv[:, qk_width:].view(N, num_kv_heads, D)
    keep = slots >= 0
    k_cache.view(-1, num_kv_heads, D).index_copy_(0, slots[keep], k[keep].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, D).index_copy_(0, slots[keep], v[keep].to(v_cache.dtype))
    return qk[:, :num_heads]


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Apply rotary to q and k of `qkv`, store k and v at their cache slots, return q.

    Args:
        qkv: [N, (Hq + 2 Hkv) D] output of the fused q/k/v projection (rows contiguous).
        cos, sin_signed: [max_len, D] rotary tables in the model dtype.
        positions: [N] int64 position of each token.
        k_cache, v_cache: [num_blocks, P, Hkv, D] one layer's cache (contiguous).
        slots: [N] int64 cache slot (block * P + offset); negative: not written (graph padding).
        num_heads, num_kv_heads: Hq and Hkv.

    Returns:
        q [N, Hq, D] with rotary applied, in qkv's dtype.
    """
    D = cos.shape[-1]
    if not qkv.is_cuda or D & (D - 1) or k_cache.stride(2) != D or k_cache.stride(3) != 1 or qkv.stride(1) != 1:
        return rope_write_kv_reference(qkv, cos, sin_signed, positions, k_cache, v_cache, slots,
                                       num_heads, num_kv_heads)
    N = qkv.shape[0]
    q = torch.empty(N, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    heads = num_heads + 2 * num_kv_heads
    _kernel()[(N,)](qkv, qkv.stride(0), cos, sin_signed, positions, k_cache, v_cache, slots, q,
                    k_cache.stride(0), k_cache.stride(1),
                    HQ=num_heads, HKV=num_kv_heads, BLOCK_H=1 << (heads - 1).bit_length(), D=D,
                    BLOCK_SIZE=k_cache.shape[1], num_warps=4, enable_fp_fusion=False)
    return q


@functools.cache
def _kernel():
    """Compile on first use (Triton is imported here so that CPU imports stay light)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_write(qkv_ptr, stride_t, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, slot_ptr, q_ptr,
                   stride_kb, stride_kt, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_H: tl.constexpr,
                   D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]  # head index over q | k | v
        d = tl.arange(0, D)[None, :]
        h_ok = h < HQ + 2 * HKV
        row = qkv_ptr + t * stride_t
        x = tl.load(row + h * D + d, mask=h_ok, other=0.0)  # [BLOCK_H, D]
        xr = tl.load(row + h * D + (d + D // 2) % D, mask=h_ok, other=0.0)  # roll by D/2 within each head
        pos = tl.load(pos_ptr + t)
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)  # [1, D]
        s = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)  # each product rounds like torch's
        b = (xr.to(tl.float32) * s).to(x.dtype).to(tl.float32)
        y = (a + b).to(x.dtype)
        is_v = h >= HQ + HKV
        out = tl.where(is_v, x, y)  # v is not rotated
        tl.store(q_ptr + t * HQ * D + h * D + d, out, mask=h < HQ)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            base = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt
            kv_head = tl.where(is_v, h - HQ - HKV, h - HQ)
            dst = base + kv_head * D + d
            is_k = (h >= HQ) & (h < HQ + HKV)
            tl.store(k_ptr + dst, out.to(k_ptr.dtype.element_ty), mask=is_k)
            tl.store(v_ptr + dst, out.to(v_ptr.dtype.element_ty), mask=is_v & h_ok)

    return rope_write
