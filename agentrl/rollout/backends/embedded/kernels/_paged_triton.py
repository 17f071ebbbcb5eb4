"""Triton kernels of the paged attention (CUDA only).

Imported lazily by `paged_attention.py` on first use on a GPU, so that importing agentrl on a CPU
machine never needs Triton. The launch wrappers, shapes and references live in `paged_attention.py`.

`DOT_PRECISION` is "ieee" for float32 inputs: Triton's default for a float32 `tl.dot` is TF32
(10-bit mantissa), which on a model with large attention scores moved a float32 engine's greedy
output off the float32 reference by a 10-nat margin on an H200 (the scores' rounding flipped which
key dominated a near one-hot softmax). Half-precision inputs are unaffected.
"""

import triton
import triton.language as tl


@triton.jit
def decode_split(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, qk_scale,
                 stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb,
                 stride_ob, stride_oh, stride_os,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
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
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
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
def _prefill_keys(acc, m, l, q, q_pos, k_ptr, v_ptr, table_row, n0, kv_end, kv_h, qk_scale,
                  stride_kb, stride_kt, stride_kh, d, d_ok,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  EVEN_D: tl.constexpr, ACC_IN_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One block of BLOCK_N keys [n0, n0 + BLOCK_N) folded into the online softmax of a query tile.
    # MASKED=False: every key is below every query row's position and below kv_end (no masks at all).
    n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_ok = n < kv_end
        block = tl.load(table_row + n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        block = tl.load(table_row + n // BLOCK_SIZE)
    row = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_h * stride_kh  # [BLOCK_N]
    ptrs = row[:, None] + d[None, :]
    if MASKED:
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptr + ptrs)
        v = tl.load(v_ptr + ptrs)
    else:
        k = tl.load(k_ptr + ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + ptrs, mask=d_ok[None, :], other=0.0)
    # Raw scores; the scale (log2 units) is folded into the exponent's multiply-add, and into the max
    # (qk_scale > 0, so max(s) * qk_scale = max(s * qk_scale)).
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if MASKED:
        scores = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    else:
        m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
        m_use = m_new
    p = tl.exp2(scores * qk_scale - m_use[:, None])
    alpha = tl.exp2(m - m_use)
    l = l * alpha + tl.sum(p, 1)
    if ACC_IN_DOT:  # the rescaled accumulator goes into the matrix multiply-accumulate itself
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l


@triton.jit
def prefill(q_ptr, k_ptr, v_ptr, table_ptr, cu_q_ptr, lens_ptr, out_ptr, qk_scale,
            stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_on, stride_oh,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr,
            ACC_IN_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program: query head h of BLOCK_M new tokens (tile mb) of sequence b. The grid is
    # (Hq, B, tiles): consecutive programs are the query heads of one KV head (they read the same
    # K/V at about the same time, so it is served from L2), and the last tiles of every sequence,
    # which see the most keys, are launched first (mb counts down) so the long programs start early.
    h, b = tl.program_id(0), tl.program_id(1)
    mb = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    kv_h = h // GROUP
    seq_len = tl.load(lens_ptr + b)
    prefix = seq_len - q_len
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_ok, d_ok = rows < q_len, d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_qn + h * stride_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + rows  # [BLOCK_M]
    # Keys below the tile's first position are visible to all its rows; the causal mask is needed
    # only from there to the tile's last row (or the sequence's end).
    kv_end = tl.minimum(seq_len, prefix + (mb + 1) * BLOCK_M)
    if SPLIT_DIAGONAL:
        open_end = ((prefix + mb * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        open_end = 0
    table_row = table_ptr + b * stride_tb
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, open_end, BLOCK_N):
        acc, m, l = _prefill_keys(acc, m, l, q, q_pos, k_ptr, v_ptr, table_row, n0, kv_end, kv_h, qk_scale,
                                  stride_kb, stride_kt, stride_kh, d, d_ok, BLOCK_SIZE, BLOCK_N, False,
                                  HEAD_DIM == BLOCK_D, ACC_IN_DOT, DOT_PRECISION)
    for n0 in range(open_end, kv_end, BLOCK_N):
        acc, m, l = _prefill_keys(acc, m, l, q, q_pos, k_ptr, v_ptr, table_row, n0, kv_end, kv_h, qk_scale,
                                  stride_kb, stride_kt, stride_kh, d, d_ok, BLOCK_SIZE, BLOCK_N, True,
                                  HEAD_DIM == BLOCK_D, ACC_IN_DOT, DOT_PRECISION)
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
