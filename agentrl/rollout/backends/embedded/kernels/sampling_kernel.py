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
    """Compile on first use (Triton is imported there so that CPU imports stay light)."""
    from agentrl.rollout.backends.embedded.kernels import _sampling_triton

    return _sampling_triton
