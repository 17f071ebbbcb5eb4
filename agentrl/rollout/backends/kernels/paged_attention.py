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
import types

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
_PREFILL_BLOCK_M, _PREFILL_BLOCK_N = 64, 64


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int) -> int:
    """Splits per sequence: the largest power of two (1..16) keeping programs within ~4 per SM.

    Depends on shapes only (`max_tokens` = block-table width * block size), so one CUDA graph
    serves every `seq_lens`; inside the kernel each sequence divides its own length by the splits.
    Measured on an H100 (Qwen2-0.5B heads, context 512): B=64 is fastest at 4 splits (512
    programs), B=256 at 1 (512 programs); more splits only add partial-result traffic.
    """
    useful = max(-(-max_tokens // _DECODE_BLOCK_N), 1)
    splits = 1
    while splits < min(useful, 16) and batch * num_kv_heads * splits * 2 <= 4 * num_sms:
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
        BLOCK_SIZE=block_size, BLOCK_N=_DECODE_BLOCK_N, SPLITS=num_splits, num_warps=_DECODE_WARPS,
        num_stages=_DECODE_STAGES)
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
    grid = (_cdiv(max_seqlen_q, _PREFILL_BLOCK_M), batch, num_q_heads)
    kern.prefill[grid](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=_PREFILL_BLOCK_M, BLOCK_N=_PREFILL_BLOCK_N, num_warps=4, num_stages=2)
    return out


def _triton_write_kv(k_cache, v_cache, k, v, slot_mapping):
    kern = _kernels()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kern.write_kv[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), BLOCK_SIZE=k_cache.shape[1],
        NUM_HEADS=num_kv_heads, BLOCK_H=_next_pow2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=_next_pow2(head_dim), num_warps=1)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels():
    """Compile-on-first-use Triton kernels; Triton is imported here so that CPU imports stay light.

    The kernels are closures of this function (Triton resolves the captured `tl`), which keeps
    `import triton` out of module import without a second module.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - CUDA builds of torch ship Triton
        raise RuntimeError("paged attention on CUDA needs Triton, which ships with CUDA builds of torch; "
                           "reinstall torch with CUDA support") from exc

    @triton.jit
    def decode_split(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, qk_scale,
                     stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb,
                     stride_ob, stride_oh, stride_os,
                     GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        # One program: sequence b, KV head h, split s; all GROUP query heads of h at once.
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N  # this sequence's split length
        start = s * chunk
        end = tl.minimum(start + chunk, seq_len)
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        g_ok, d_ok = g < GROUP, d < HEAD_DIM
        heads = h * GROUP + g  # [BLOCK_G]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            block = tl.load(table_ptr + b * stride_tb + n // BLOCK_SIZE, mask=n_ok, other=0)
            row = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + h * stride_kh  # [BLOCK_N]
            kv_mask = n_ok[:, None] & d_ok[None, :]
            # V is loaded before the scores are computed so that both reads are in flight at once.
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty split (or seq_len 0) gives zeros
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        if SPLITS > 1:
            lse = tl.where(l > 0, m + tl.log2(l), float("-inf"))
            lse_row = b * tl.num_programs(1) * GROUP + heads  # row of [B * Hq]
            tl.store(lse_ptr + lse_row * SPLITS + s, lse, mask=g_ok)

    @triton.jit
    def decode_merge(part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        # One program: sequence b, query head h; weights each split by 2^(lse_s - max lse).
        b, h = tl.program_id(0), tl.program_id(1)
        s, d = tl.arange(0, SPLITS), tl.arange(0, BLOCK_D)
        lse = tl.load(lse_ptr + (b * tl.num_programs(1) + h) * SPLITS + s)  # [SPLITS]
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top)  # [SPLITS], 0 for empty splits
        part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                       mask=(d < HEAD_DIM)[None, :], other=0.0)  # [SPLITS, BLOCK_D]
        out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    @triton.jit
    def prefill(q_ptr, k_ptr, v_ptr, table_ptr, cu_q_ptr, lens_ptr, out_ptr, qk_scale,
                stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_on, stride_oh,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program: BLOCK_M new tokens of sequence b, query head h.
        mb, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_h = h // GROUP
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        seq_len = tl.load(lens_ptr + b)
        prefix = seq_len - q_len
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        r_ok, d_ok = rows < q_len, d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_qn + h * stride_qh + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        q_pos = prefix + rows  # [BLOCK_M]
        # Causal: this tile's last row sees up to position prefix + mb*BLOCK_M + BLOCK_M - 1.
        kv_end = tl.where(mb * BLOCK_M < q_len, tl.minimum(seq_len, prefix + (mb + 1) * BLOCK_M), 0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            block = tl.load(table_ptr + b * stride_tb + n // BLOCK_SIZE, mask=n_ok, other=0)
            row = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_h * stride_kh
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
            scores = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows may see nothing
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_on + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])

    @triton.jit
    def write_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
                 stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr,
                 BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: token i, all its KV heads; a negative slot writes nothing.
        i = tl.program_id(0)
        slot = tl.load(slot_ptr + i)
        hh, d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        mask = (hh < NUM_HEADS)[:, None] & (d < HEAD_DIM)[None, :] & (slot >= 0)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + hh[:, None] * stride_ch + d[None, :]
        k = tl.load(k_ptr + i * stride_kn + hh[:, None] * stride_kh + d[None, :], mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + i * stride_vn + hh[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)

    return types.SimpleNamespace(decode_split=decode_split, decode_merge=decode_merge, prefill=prefill,
                                 write_kv=write_kv)
