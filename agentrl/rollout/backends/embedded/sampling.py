"""Batched sampling on the device: one call picks the next token of every row in a step.

Each row has its own temperature, top-k, top-p, min-p and seed; the whole batch is sampled with a
handful of tensor ops and no per-row Python. Reported logprobs are those of the sampled token
under `log_softmax(logits / temperature)` in float32, before any truncation (`temperature = 0`
is greedy and reports `temperature = 1`), which is what the trainer recomputes.

Sampling inverts the CDF: one uniform number per row, searched in the cumulative sum of the
(truncated) probabilities, which costs S random numbers rather than S * V. Unseeded rows take it
from torch's generator; a seeded row takes it from a counter-based hash of (seed, output position),
so a seeded request gives the same tokens whatever else shares its batch, after preemption, and
on any device.

Truncation order: top-k, then top-p over what top-k kept (renormalised), then min-p (relative to
the most likely token). Tokens tied with a cut-off value are kept.

Letters: S rows sampled this step, V vocabulary size, R seeded rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.transfer import to_device
from agentrl.rollout.engine import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row parameters as device tensors; a filter nobody uses is None and costs nothing."""

    temperature: torch.Tensor | None  # [S, 1] float32 (greedy rows hold 1); None: every row uses 1
    greedy_rows: torch.Tensor | None  # [S] bool, rows with temperature 0; None: there are none
    top_p: torch.Tensor | None  # [S] float32
    top_k: torch.Tensor | None  # [S] int64, 0 = off
    min_p: torch.Tensor | None  # [S] float32
    seeded_rows: torch.Tensor | None  # [R] int64 row indices with a seed
    seeds: torch.Tensor | None  # [R] int64
    positions: torch.Tensor | None  # [R] int64: index of the token being sampled in the output
    all_greedy: bool
    top_k_max: int  # largest top_k (known on the host: reading it from the device would wait for it)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], positions: Sequence[int], device: torch.device) -> SamplingBatch:
        """`params[i]` samples row i, whose new token is output token number `positions[i]`."""
        temps = [p.temperature for p in params]
        sampled = [p for p in params if p.temperature > 0]

        def tensor(values, dtype=torch.float32):
            return to_device(torch.tensor(values, dtype=dtype), device)

        seeded = [i for i, p in enumerate(params) if p.seed is not None and p.temperature > 0]
        return cls(
            temperature=tensor([t if t > 0 else 1.0 for t in temps]).unsqueeze(-1)
            if any(t not in (0, 1) for t in temps) else None,
            greedy_rows=tensor([t <= 0 for t in temps], torch.bool) if len(sampled) < len(params) else None,
            top_p=tensor([p.top_p for p in params]) if any(p.top_p < 1 for p in sampled) else None,
            top_k=tensor([p.top_k for p in params], torch.long) if any(p.top_k > 0 for p in sampled) else None,
            min_p=tensor([p.min_p for p in params]) if any(p.min_p > 0 for p in sampled) else None,
            seeded_rows=tensor(seeded, torch.long) if seeded else None,
            seeds=tensor([params[i].seed % 2**63 for i in seeded], torch.long) if seeded else None,
            positions=tensor([positions[i] for i in seeded], torch.long) if seeded else None,
            all_greedy=not sampled,
            top_k_max=max((p.top_k for p in params), default=0),
        )


def validate(params: SamplingParams) -> None:
    """Raise EngineError for parameters no backend could honour."""
    problems = []
    if not math.isfinite(params.temperature) or params.temperature < 0:
        problems.append(f"temperature={params.temperature} (expected a finite number >= 0)")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p={params.top_p} (expected in (0, 1])")
    if params.top_k < 0:
        problems.append(f"top_k={params.top_k} (expected >= 0; 0 turns it off)")
    if not 0 <= params.min_p < 1:
        problems.append(f"min_p={params.min_p} (expected in [0, 1))")
    if params.max_tokens < 0:
        problems.append(f"max_tokens={params.max_tokens} (expected >= 0)")
    if problems:
        raise EngineError("bad sampling parameters: " + "; ".join(problems))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), a pure function of (seed, position).

    Args:
        seeds: [R] int64, non-negative.
        positions: [R] int64 output positions.

    Returns:
        [R] float64 (48 random bits).
    """
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    a = _mix32(_mix32(_mix32(lo) ^ hi) ^ (positions & _M32))  # [R]
    b = _mix32(a ^ 0x5BD1E995)
    bits = (a << 16) | (b >> 16)  # 48 bits
    return (bits.double() + 0.5) * 2.0**-48


def _truncate(logp: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Set the log-probabilities of tokens outside top-k / top-p / min-p to -inf. logp: [S, V]."""
    S, V = logp.shape
    out = logp
    if b.top_p is not None:
        sorted_lp = logp.sort(dim=-1, descending=True).values  # [S, V]
        k = torch.full((S,), V, device=logp.device) if b.top_k is None else torch.where(
            b.top_k > 0, b.top_k.clamp(max=V), V)  # [S]
        probs = sorted_lp.exp() * (torch.arange(V, device=logp.device) < k.unsqueeze(-1))  # [S, V]
        cum = probs.cumsum(-1)
        ahead = cum - probs  # mass strictly ahead of each token
        keep = torch.minimum(k, (ahead < b.top_p.unsqueeze(-1) * cum[:, -1:]).sum(-1))  # [S]
        out = out.masked_fill(logp < sorted_lp.gather(-1, (keep - 1).unsqueeze(-1)), float("-inf"))
    elif b.top_k is not None:
        k_max = b.top_k_max
        top = logp.topk(min(k_max, V), dim=-1).values  # [S, k_max]
        k = torch.where(b.top_k > 0, b.top_k.clamp(max=V), k_max).clamp(max=top.shape[-1])
        cut = top.gather(-1, (k - 1).unsqueeze(-1))  # [S, 1]
        cut = torch.where((b.top_k > 0).unsqueeze(-1), cut, float("-inf"))
        out = out.masked_fill(logp < cut, float("-inf"))
    if b.min_p is not None:
        floor = logp.max(-1, keepdim=True).values + torch.log(b.min_p).unsqueeze(-1)  # [S, 1]; log 0 = -inf
        out = out.masked_fill(logp < floor, float("-inf"))
    return out


def _uniforms(b: SamplingBatch, rows: int, device: torch.device) -> torch.Tensor:
    """One uniform number per row, [S] float64: torch's generator, or the hash of (seed, position)."""
    u = torch.rand(rows, device=device, dtype=torch.float64)
    if b.seeded_rows is not None:
        u[b.seeded_rows] = seeded_uniform(b.seeds, b.positions)
    return u


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (tokens [S] int64, logprobs [S] float32).

    On CUDA, a batch without top-k/top-p/min-p takes the one-kernel path of
    `kernels/sampling_kernel.py` (same algorithm, two reads of the logits instead of five float32
    passes); everything else runs `sample_reference`.

    Args:
        logits: [S, V] next-token logits (any float dtype; sampling runs in float32).
        b: The rows' parameters.
    """
    if logits.is_cuda and b.top_p is None and b.top_k is None and b.min_p is None:
        from agentrl.rollout.backends.embedded.kernels.sampling_kernel import sample_full_distribution

        u = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float64) if b.all_greedy \
            else _uniforms(b, logits.shape[0], logits.device)
        return sample_full_distribution(logits, b.temperature, u, b.greedy_rows)
    return sample_reference(logits, b)


def sample_reference(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` in torch ops: float32 log-softmax, truncation, cumulative sum, search."""
    logits = logits.float()
    if b.all_greedy:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(logits if b.temperature is None else logits / b.temperature, -1)  # [S, V], reported
    cdf = _truncate(logp, b).exp().cumsum(-1)  # [S, V]
    u = _uniforms(b, cdf.shape[0], cdf.device)  # [S]
    total = cdf[:, -1:]  # [S, 1]
    target = (u.unsqueeze(-1) * total.double()).to(cdf.dtype)  # [S, 1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach the end
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    if b.greedy_rows is not None:
        tokens = torch.where(b.greedy_rows, logits.argmax(-1), tokens)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class StopStrings:
    """Ends a sequence when its decoded output contains one of `stops`.

    Only the last few tokens are decoded each step: a stop string that ends in the newest token
    lies inside the last `max(len(stop)) + 1` tokens (every token decodes to at least one char),
    and one that ended earlier would have stopped the sequence then. The token that completes
    the stop string is kept in the output, like a stop token.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        if tokenizer is None:
            raise EngineError("stop strings need a tokenizer, and this engine has none; pass tokenizer= to the "
                              "engine or load it from a model directory that includes one")
        if any(not s for s in stops):
            raise EngineError(f"stop strings must be non-empty; got {list(stops)!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = max(len(s) for s in stops) + 1

    def __call__(self, seq) -> bool:
        tail = seq.tokens[max(seq.prompt_len, len(seq.tokens) - self.window):]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in self.stops)
