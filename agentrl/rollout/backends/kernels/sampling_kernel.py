"""Sampling from the full distribution in one Triton kernel (CUDA), for rows without top-k/top-p/min-p.

`sampling.sample` inverts the CDF in torch: a float32 copy of the logits, `log_softmax`, `exp`,
`cumsum` and `searchsorted`, five passes over an `[S, V]` float32 tensor. At a 151,936-token
vocabulary that is ~0.5 ms of a ~2 ms decode step at 64 rows (`cumsum` alone is ~260 us: its scan
kernel is parallel over rows only). This kernel reads each row of logits twice and writes nothing
but the result:

1. online max and sum of `exp(x / T)`, giving the row's log-normaliser `lse`, and its argmax;
2. the running sum of `p = exp(x / T - lse)` chunk by chunk, counting the positions whose
   cumulative probability is <= the row's uniform number `u`: that count is the sampled index
   (what `searchsorted(cdf, u, right=True)` returns, so zero-probability tokens are never picked).
   If rounding leaves the last cumulative value below `u`, the last token with non-zero
   probability is taken.

The reported logprob is `x[token] / T - lse` in float32, like the torch path. Rows with
temperature 0 take the argmax (first maximum) and report it at temperature 1. The torch path
(`sampling.sample_reference_full`) is what the GPU tests compare against; token choices can
differ only where `u` falls within float32 rounding of a CDF boundary.

Letters: S rows, V vocabulary, C chunk of the vocabulary one loop iteration reads.
"""

from __future__ import annotations

import functools

import torch

_CHUNK = 4096


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
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(S, dtype=torch.float32, device=logits.device)
    if S == 0:
        return tokens, logprobs
    temp = logits if temperature is None else temperature.reshape(S).float().contiguous()
    g = logits if greedy is None else greedy.to(torch.int8).contiguous()
    _kernel()[(S,)](logits, logits.stride(0), V, temp, u.float().contiguous(), g, tokens, logprobs,
                    HAS_TEMP=temperature is not None, HAS_GREEDY=greedy is not None, CHUNK=_CHUNK,
                    num_warps=8)
    return tokens, logprobs


@functools.cache
def _kernel():
    """Compile on first use (Triton is imported here so that CPU imports stay light)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sample_rows(x_ptr, stride, V, t_ptr, u_ptr, g_ptr, tok_ptr, lp_ptr,
                    HAS_TEMP: tl.constexpr, HAS_GREEDY: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        offs = tl.arange(0, CHUNK)
        inv_t = 1.0
        if HAS_TEMP:
            inv_t = 1.0 / tl.load(t_ptr + row)
        is_greedy = False
        if HAS_GREEDY:
            is_greedy = tl.load(g_ptr + row) != 0
            inv_t = tl.where(is_greedy, 1.0, inv_t)
        # Pass 1: max, sum of exp (online), first argmax.
        m = float("-inf")
        s = 0.0
        best = float("-inf")
        best_i = 0
        for start in range(0, V, CHUNK):
            idx = start + offs
            raw = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            x = raw * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of only -inf: no NaN from -inf - -inf
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            m = m_new
            rm = tl.max(raw, 0)
            ri = tl.min(tl.where(raw == rm, idx, V), 0)  # first index of the chunk's maximum
            better = rm > best
            best_i = tl.where(better, ri, best_i)
            best = tl.where(better, rm, best)
        lse = m + tl.log(s)
        # Pass 2: count cumulative probabilities <= u; remember the last non-zero probability.
        target = tl.load(u_ptr + row)
        run = 0.0
        count = 0
        last_nz = 0
        for start in range(0, V, CHUNK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(x - lse)
            c = tl.cumsum(p, 0) + run
            count += tl.sum(((c <= target) & (idx < V)).to(tl.int32), 0)
            last_nz = tl.maximum(last_nz, tl.max(tl.where(p > 0, idx, 0), 0))
            run = tl.max(c, 0)
        tok = tl.minimum(count, last_nz)
        if HAS_GREEDY:
            tok = tl.where(is_greedy, best_i, tok)
        lp = tl.load(base + tok).to(tl.float32) * inv_t - lse
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, lp)

    return sample_rows
