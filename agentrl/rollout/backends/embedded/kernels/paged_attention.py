"""Attention over a paged KV cache: decode, prefill and the K/V write, for the built-in engine.

The cache of one layer is a pool of fixed-size blocks; a sequence owns a list of blocks (its row of
the block table), so memory grows with real tokens and blocks can be shared between sequences.
Each public function dispatches to a Triton kernel on CUDA and to a torch reference elsewhere; the
references compute in float32 and are what the GPU kernels are tested against.

The decode kernel is flash-decoding: one program per (sequence, KV head, split) reads its slice of
the sequence's K/V once for all the query heads of that KV head (GQA), keeps an online softmax in
float32, and a second small kernel merges the splits by their log-sum-exp. Its grid depends only on
shapes, never on `seq_lens` values, and nothing syncs with the host, so it can be captured in a CUDA
graph: each program finds its token range from `seq_lens` on the device. Eager calls spend more
time launching than computing at small batches (~90 us of CPU per decode call at B=64): capture.

Prefill is a Triton kernel too: torch 2.11's `varlen_attn` (bottom-right aligned causal mask, as
flash-attn >= 2.1) takes neither a block table nor fewer KV heads, and gathering K/V for it made
it 2-18x slower than this kernel on an H100 (bench/paged_attention.py).

Letters: B sequences, Hq query heads, Hkv KV heads (Hq = G * Hkv), D head dim, P block size
(tokens per block), M block-table width (blocks per sequence), S decode splits, N tokens written,
Nq new query tokens of a prefill (all sequences packed).
"""

from __future__ import annotations

import functools

import torch

_LOG2E = 1.4426950408889634


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, head_dim: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != head_dim or num_q_heads % k_cache.shape[2]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of the cache's KV heads "
                         f"({k_cache.shape[2]}) and head dims must match (q {head_dim}, cache {k_cache.shape[3]})")


# ----------------------------------------------------------------------------------------------
# Torch references (CPU path, and the yardstick of the GPU tests).
# ----------------------------------------------------------------------------------------------

def write_kv_reference(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Torch version of `write_kv` (skips negative slots with a data-dependent mask: not graph-safe)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale: float) -> torch.Tensor:
    """Torch version of `paged_decode_attention`: gather every table entry, mask, softmax in float32.

    Its cost grows with the block table's width M, not with `seq_lens`: on CPU pass a table sliced
    to the blocks in use. A sequence with `seq_len` 0 gets zeros.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(block_table.shape[1] * block_size, device=q.device)  # [M*P]
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, M*P]
    blocks = torch.where(valid, block_table[:, pos // block_size].long(), 0)  # [B, M*P]
    k = k_cache[blocks, pos % block_size].float()  # [B, M*P, Hkv, D]
    v = v_cache[blocks, pos % block_size].float()
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1))  # all-masked rows (seq_len 0) -> 0
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)  # [B, Hkv, G, D]
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def paged_prefill_attention_reference(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                                      scale: float) -> torch.Tensor:
    """Torch version of `paged_prefill_attention`: one float32 causal attention per sequence."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    bounds, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, (start, end, seq_len) in enumerate(zip(bounds[:-1], bounds[1:], lens)):
        if end == start:
            continue
        pos = torch.arange(seq_len, device=q.device)  # [L]
        blocks = block_table[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[blocks, pos % block_size].float().transpose(0, 1)
        q_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)  # [n]
        mask = pos[None, :] <= q_pos[:, None]  # [n, L]: the new tokens are the last n positions
        qs = q[start:end].float().transpose(0, 1)  # [Hq, n, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, k, v, attn_mask=mask, scale=scale, enable_gqa=qs.shape[0] != k.shape[0])
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------

def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Scatter new keys and values into their cache slots, in place.

    Args:
        k_cache: [num_blocks, P, Hkv, D] key cache of one layer (contiguous).
        v_cache: [num_blocks, P, Hkv, D] value cache of one layer.
        k: [N, Hkv, D] new keys (cast to the cache's dtype).
        v: [N, Hkv, D] new values.
        slot_mapping: int64 [N], slot = block_id * P + offset; a negative slot is skipped (padding
            rows of a CUDA-graph batch).

    On CUDA one Triton launch writes both caches and is graph-capturable.
    """
    if k.shape[0] == 0:
        return
    if k_cache.is_cuda:
        _triton_write_kv(k_cache, v_cache, k, v, slot_mapping)
    else:
        write_kv_reference(k_cache, v_cache, k, v, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over all its cached tokens.

    Args:
        q: [B, Hq, D] queries of the tokens being decoded.
        k_cache: [num_blocks, P, Hkv, D] key cache of one layer (the new tokens' keys already written).
        v_cache: [num_blocks, P, Hkv, D] value cache.
        block_table: int32 [B, M], physical block of each sequence's logical block.
        seq_lens: int32 [B], cached tokens of each sequence, the token being decoded included.
        scale: softmax scale, usually D ** -0.5.
        num_splits: CUDA only: splits of each sequence's tokens (a power of two); default from shapes.

    Returns:
        [B, Hq, D] in q's dtype.

    Example:
        >>> out = paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, q.shape[-1] ** -0.5)
    """
    _check_cache(k_cache, v_cache, q.shape[1], q.shape[2])
    if q.is_cuda:
        return _triton_decode(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale: float,
                            max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    """Causal attention of new tokens over their sequences' cached prefix and themselves.

    Each sequence's new tokens are its last `q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b]`
    positions; the positions before them are a cached prefix (e.g. from a prefix cache). The new
    tokens' K/V must already be written to the cache.

    Args:
        q: [Nq, Hq, D] queries of all sequences' new tokens, packed.
        k_cache: [num_blocks, P, Hkv, D] key cache of one layer.
        v_cache: [num_blocks, P, Hkv, D] value cache.
        block_table: int32 [B, M].
        cu_seqlens_q: int32 [B + 1], offsets of each sequence's new tokens in q.
        seq_lens: int32 [B], total tokens of each sequence (prefix + new).
        scale: softmax scale.
        max_seqlen_q: the largest q_len (sets the CUDA grid).
        max_seqlen_k: the largest seq_len (unused by the Triton kernel; kept for flash-attn parity).

    Returns:
        [Nq, Hq, D] in q's dtype.
    """
    _check_cache(k_cache, v_cache, q.shape[1], q.shape[2])
    if q.is_cuda:
        return _triton_prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, max_seqlen_q)
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale)


# ----------------------------------------------------------------------------------------------
# Triton launchers.
# ----------------------------------------------------------------------------------------------

_DECODE_BLOCK_N = 64  # tokens per inner step of the decode kernel
_DECODE_WARPS = 2  # H100 sweep: 2 warps ~1% faster than 4 at B=64 and B=256
_DECODE_STAGES = 2
# Prefill tile: BLOCK_M query rows x BLOCK_N keys per inner step; `bench/paged_attention.py --long`
# sweeps these (and SPLIT_DIAGONAL: unmasked key blocks below the diagonal, masked ones on it; and
# ACC_IN_DOT: the P @ V product accumulates into the rescaled output in the dot itself, not yet
# measured on a GPU, so off).
_PREFILL_BLOCK_M, _PREFILL_BLOCK_N, _PREFILL_WARPS, _PREFILL_STAGES = 64, 64, 4, 2
_PREFILL_SPLIT_DIAGONAL, _PREFILL_ACC_IN_DOT = True, False
PREFILL_KNOBS = ("_PREFILL_BLOCK_M", "_PREFILL_BLOCK_N", "_PREFILL_WARPS", "_PREFILL_STAGES",
                 "_PREFILL_SPLIT_DIAGONAL", "_PREFILL_ACC_IN_DOT")  # what the bench and the tests set


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int) -> int:
    """Splits per sequence: the largest power of two (1..32) keeping programs within ~4 per SM.

    Depends on shapes only (`max_tokens` = block-table width * block size), so one CUDA graph
    serves every `seq_lens`; inside the kernel each sequence divides its own length by the splits.
    Measured on an H100 (Qwen2-0.5B heads, context 512): B=64 is fastest at 4 splits (512
    programs), B=256 at 1 (512 programs); more splits only add partial-result traffic. On an H200 at
    long contexts (bench/paged_attention.py --long) the same rule is within 7% of the best split count
    from B=16 x 16k to B=64 x 4k; B=8 x 32k needs 32 splits (42 us a layer; 61 us at the old cap of 16).
    """
    useful = max(-(-max_tokens // _DECODE_BLOCK_N), 1)
    splits = 1
    while splits < min(useful, 32) and batch * num_kv_heads * splits * 2 <= 4 * num_sms:
        splits *= 2
    return splits


def _triton_decode(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits):
    kern = _kernels()
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if q.stride(-1) != 1:  # rows and heads may be strided (a view of the fused qkv); the last dim may not
        q = q.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_table.shape[1] * block_size,
                                        _num_sms(q.device.index or 0))
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_splits == 1:
        part, lse = out, out  # the split kernel writes the final output; lse is not stored
        part_strides = (out.stride(0), out.stride(1), 0)
    else:
        part = torch.empty(batch, num_q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
        part_strides = (part.stride(0), part.stride(1), part.stride(2))
    kern.decode_split[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, part, lse, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), *part_strides,
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=_DECODE_BLOCK_N, SPLITS=num_splits, DOT_PRECISION=_dot_precision(q),
        num_warps=_DECODE_WARPS, num_stages=_DECODE_STAGES)
    if num_splits > 1:
        kern.decode_merge[(batch, num_q_heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim), SPLITS=num_splits, num_warps=1)
    return out


def _triton_prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, max_seqlen_q):
    kern = _kernels()
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out
    grid = (num_q_heads, batch, _cdiv(max_seqlen_q, _PREFILL_BLOCK_M))
    kern.prefill[grid](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=_PREFILL_BLOCK_M, BLOCK_N=_PREFILL_BLOCK_N,
        SPLIT_DIAGONAL=_PREFILL_SPLIT_DIAGONAL, ACC_IN_DOT=_PREFILL_ACC_IN_DOT, DOT_PRECISION=_dot_precision(q),
        num_warps=_PREFILL_WARPS, num_stages=_PREFILL_STAGES)
    return out


def _triton_write_kv(k_cache, v_cache, k, v, slot_mapping):
    kern = _kernels()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kern.write_kv[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), BLOCK_SIZE=k_cache.shape[1],
        NUM_HEADS=num_kv_heads, BLOCK_H=_next_pow2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=_next_pow2(head_dim), num_warps=1)


def _dot_precision(q: torch.Tensor) -> str:
    """IEEE products for float32 inputs (Triton's float32 default is TF32; see _paged_triton.py)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels():
    """The Triton kernels (compiled on first use); Triton is imported only here, on CUDA."""
    try:
        from agentrl.rollout.backends.embedded.kernels import _paged_triton
    except ImportError as exc:  # pragma: no cover - CUDA builds of torch ship Triton
        raise RuntimeError("paged attention on CUDA needs Triton, which ships with CUDA builds of torch; "
                           "reinstall torch with CUDA support") from exc
    return _paged_triton
