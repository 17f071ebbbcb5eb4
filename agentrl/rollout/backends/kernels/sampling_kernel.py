"""Sampling from the full distribution in two small Triton kernels (CUDA), for rows without top-k/top-p/min-p.

`sampling.sample_reference` inverts the CDF in torch: a float32 copy of the logits, `log_softmax`,
`exp`, `cumsum` and `searchsorted`, five passes over an `[S, V]` float32 tensor. At a 151,936-token
vocabulary that is ~0.5 ms of a ~2 ms decode step at 64 rows (`cumsum` alone is ~260 us: its scan
kernel is parallel over rows only). Here each row's vocabulary is cut into NB slices, so a step
runs S * NB programs (about four per SM), and the logits are read about once:

1. `partials` (one program per row and slice): the slice's max and sum of `exp(x / T - max)`, and
   its first argmax.
2. `pick` (same grid): every program combines its row's NB partials into the log-normaliser
   `lse` and each slice's probability mass; the one slice whose cumulative mass interval holds the
   row's uniform number `u` scans its own logits, counting positions whose cumulative probability
   is <= `u`: that count is the sampled index (what `searchsorted(cdf, u, right=True)` returns, so a
   zero-probability token is never picked). If rounding leaves `u` above the total, the last slice
   with mass takes it, and within a slice the last token with non-zero probability.

The reported logprob is `x[token] / T - lse` in float32, like the torch path. Rows with
temperature 0 take the argmax (first maximum) and report it at temperature 1. The torch path is
what the GPU tests compare against; token choices can differ only where `u` falls within float32
rounding of a CDF boundary.

Letters: S rows, V vocabulary, NB slices per row, C chunk of a slice one loop iteration reads.
"""

from __future__ import annotations

import functools

import torch

_CHUNK = 2048


def _slices(rows: int, vocab: int, num_sms: int) -> int:
    """Slices per row: a power of two giving ~4 programs per SM, at most 64, none emptier than a chunk."""
    nb = 1
    while nb < 64 and rows * nb < 4 * num_sms and vocab > nb * _CHUNK:
        nb *= 2
    return nb


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sample_full_distribution(logits: torch.Tensor, temperature: torch.Tensor | None, u: torch.Tensor,
                             greedy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from softmax(logits / T) by inverting the CDF at `u`.

    Args:
        logits: [S, V] (any float dtype; math in float32), rows contiguous.
        temperature: [S] or [S, 1] float32 (> 0), or None for 1 everywhere.
        u: [S] uniform numbers in (0, 1) (float32 or float64).
        greedy: [S] bool rows that take the argmax instead, or None.

    Returns:
        (tokens [S] int64, logprobs [S] float32).
    """
    S, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    dev = logits.device
    tokens = torch.empty(S, dtype=torch.int64, device=dev)
    logprobs = torch.empty(S, dtype=torch.float32, device=dev)
    if S == 0:
        return tokens, logprobs
    nb = _slices(S, V, _num_sms(dev.index or 0))
    width = -(-(-(-V // nb)) // _CHUNK) * _CHUNK  # slice width, whole chunks
    part = torch.empty(4, S, nb, dtype=torch.float32, device=dev)  # max, sum, best value, best index
    temp = logits if temperature is None else temperature.reshape(S).float().contiguous()
    g = logits if greedy is None else greedy.to(torch.int8).contiguous()
    kern = _kernels()
    flags = dict(HAS_TEMP=temperature is not None, HAS_GREEDY=greedy is not None, CHUNK=_CHUNK)
    kern.partials[(S, nb)](logits, logits.stride(0), V, width, temp, g, part, NB=nb, num_warps=4, **flags)
    kern.pick[(S, nb)](logits, logits.stride(0), V, width, temp, u.float().contiguous(), g, part, tokens, logprobs,
                       NB=nb, BLOCK_NB=max(nb, 2), num_warps=4, **flags)
    return tokens, logprobs


@functools.cache
def _kernels():
    """Compile on first use (Triton is imported here so that CPU imports stay light)."""
    import types

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

    return types.SimpleNamespace(partials=partials, pick=pick)
