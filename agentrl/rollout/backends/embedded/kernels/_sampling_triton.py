"""Triton kernels of the sampler (CUDA only).

Imported lazily by `sampling_kernel.py` on first use on a GPU, so that importing agentrl on a CPU
machine never needs Triton. The algorithm, the launch wrapper and the torch reference it is tested
against are described there.
"""

import triton
import triton.language as tl


@triton.jit
def _inv_temperature(t_ptr, g_ptr, row, HAS_TEMP: tl.constexpr, HAS_GREEDY: tl.constexpr):
    inv_t = tl.full((), 1.0, tl.float32)
    if HAS_TEMP:
        inv_t = 1.0 / tl.load(t_ptr + row)
    is_greedy = tl.full((), 0, tl.int32)
    if HAS_GREEDY:
        is_greedy = (tl.load(g_ptr + row) != 0).to(tl.int32)
        inv_t = tl.where(is_greedy != 0, 1.0, inv_t)
    return inv_t, is_greedy


@triton.jit
def partials(x_ptr, stride, V, width, t_ptr, g_ptr, part_ptr, NB: tl.constexpr,
             HAS_TEMP: tl.constexpr, HAS_GREEDY: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    inv_t, is_greedy = _inv_temperature(t_ptr, g_ptr, row, HAS_TEMP, HAS_GREEDY)
    base = x_ptr + row * stride
    offs = tl.arange(0, CHUNK)
    lo = j * width
    hi = tl.minimum(lo + width, V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    for start in range(lo, hi, CHUNK):
        idx = start + offs
        raw = tl.load(base + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        x = raw * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # only -inf so far: no NaN from -inf - -inf
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
        rm = tl.max(raw, 0)
        ri = tl.min(tl.where(raw == rm, idx, V), 0)  # first index of the chunk's maximum
        better = rm > best
        best_i = tl.where(better, ri, best_i)
        best = tl.where(better, rm, best)
    plane = row * NB + j
    n = tl.num_programs(0).to(tl.int64) * NB
    tl.store(part_ptr + plane, m)
    tl.store(part_ptr + n + plane, s)
    tl.store(part_ptr + 2 * n + plane, best)
    tl.store(part_ptr + 3 * n + plane, best_i.to(tl.float32))


@triton.jit
def pick(x_ptr, stride, V, width, t_ptr, u_ptr, g_ptr, part_ptr, tok_ptr, lp_ptr, NB: tl.constexpr,
         BLOCK_NB: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_GREEDY: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    inv_t, is_greedy = _inv_temperature(t_ptr, g_ptr, row, HAS_TEMP, HAS_GREEDY)
    base = x_ptr + row * stride
    n = tl.num_programs(0).to(tl.int64) * NB
    k = tl.arange(0, BLOCK_NB)
    ok = k < NB
    mk = tl.load(part_ptr + row * NB + k, mask=ok, other=float("-inf"))
    sk = tl.load(part_ptr + n + row * NB + k, mask=ok, other=0.0)
    top = tl.max(mk, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    lse = top + tl.log(tl.sum(sk * tl.exp(mk - top), 0))
    mass = sk * tl.exp(mk - lse)  # [BLOCK_NB] probability of each slice
    before = tl.sum(tl.where(k < j, mass, 0.0), 0)
    mine = tl.sum(tl.where(k == j, mass, 0.0), 0)
    last = tl.max(tl.where(mass > 0, k, -1), 0)
    target = tl.load(u_ptr + row)
    claim = (mine > 0) & (before <= target) & ((target < before + mine) | (j == last)) & (is_greedy == 0)
    if claim:
        offs = tl.arange(0, CHUNK)
        lo = j * width
        hi = tl.minimum(lo + width, V)
        run = before
        count = tl.full((), 0, tl.int32)
        last_nz = lo
        for start in range(lo, hi, CHUNK):
            idx = start + offs
            inside = idx < hi
            x = tl.load(base + idx, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(x - lse)
            c = tl.cumsum(p, 0) + run
            count += tl.sum(((c <= target) & inside).to(tl.int32), 0)
            last_nz = tl.maximum(last_nz, tl.max(tl.where((p > 0) & inside, idx, lo), 0))
            run = tl.max(c, 0)
        tok = tl.minimum(lo + count, last_nz)
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, tl.load(base + tok).to(tl.float32) * inv_t - lse)
    if (is_greedy != 0) & (j == 0):
        bv = tl.load(part_ptr + 2 * n + row * NB + k, mask=ok, other=float("-inf"))
        bi = tl.load(part_ptr + 3 * n + row * NB + k, mask=ok, other=0.0).to(tl.int32)
        tok = tl.min(tl.where(bv == tl.max(bv, 0), bi, V), 0)  # slices are in order: the first maximum
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, tl.load(base + tok).to(tl.float32) - lse)
