"""Batched sampling on the device: one call picks the next token of every row in a step.

Each row has its own temperature, top-k, top-p, min-p and seed; the whole batch is sampled with a
handful of tensor ops and no per-row Python. Reported logprobs are those of the sampled token
under `log_softmax(logits / temperature)` in float32, before any truncation (`temperature = 0`
is greedy and reports `temperature = 1`), which is what the trainer recomputes.

Sampling is an exponential race: `argmax(p_i / E_i)` with `E_i ~ Exp(1)` draws index i with
probability `p_i`. Unseeded rows take E from torch's generator; a seeded row takes it from a
counter-based hash of (seed, output position, token id), so a seeded request gives the same tokens
whatever else shares its batch, after preemption, and on any device.

Truncation order: top-k, then top-p over what top-k kept (renormalised), then min-p (relative to
the most likely token). Tokens tied with a cut-off value are kept.

Letters: S rows sampled this step, V vocabulary size, R seeded rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentrl.errors import EngineError
from agentrl.rollout.engine import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row parameters as device tensors, plus flags that let `sample` skip unused filters."""

    temperature: torch.Tensor  # [S] float32, 0 = greedy
    top_p: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S] int64, 0 = off
    min_p: torch.Tensor  # [S] float32
    seeded_rows: torch.Tensor | None  # [R] int64 row indices with a seed
    seeds: torch.Tensor | None  # [R] int64
    positions: torch.Tensor | None  # [R] int64: index of the token being sampled in the output
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], positions: Sequence[int], device: torch.device) -> SamplingBatch:
        """`params[i]` samples row i, whose new token is output token number `positions[i]`."""
        temps = [p.temperature for p in params]
        seeded = [i for i, p in enumerate(params) if p.seed is not None and p.temperature > 0]
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            temperature=torch.tensor(temps, **f32),
            top_p=torch.tensor([p.top_p for p in params], **f32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            min_p=torch.tensor([p.min_p for p in params], **f32),
            seeded_rows=torch.tensor(seeded, dtype=torch.long, device=device) if seeded else None,
            seeds=torch.tensor([params[i].seed % 2**63 for i in seeded], dtype=torch.long, device=device)
            if seeded else None,
            positions=torch.tensor([positions[i] for i in seeded], dtype=torch.long, device=device) if seeded else None,
            all_greedy=all(t <= 0 for t in temps),
            any_top_k=any(p.top_k > 0 and p.temperature > 0 for p in params),
            any_top_p=any(p.top_p < 1 and p.temperature > 0 for p in params),
            any_min_p=any(p.min_p > 0 and p.temperature > 0 for p in params),
        )


def validate(params: SamplingParams) -> None:
    """Raise EngineError for parameters no backend could honour."""
    problems = []
    if params.temperature < 0:
        problems.append(f"temperature={params.temperature} (expected >= 0)")
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


def seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [R, V], a pure function of (seed, position, token id).

    Args:
        seeds: [R] int64, non-negative.
        positions: [R] int64 output positions.
        vocab: V.
    """
    row = _mix32(_mix32(_mix32(seeds & _M32) ^ ((seeds >> 32) & _M32)) ^ (positions & _M32))  # [R]
    col = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.long) + 0x9E3779B)  # [V]
    bits = _mix32(row.unsqueeze(-1) ^ col) >> 8  # [R, V], 24 random bits
    return -torch.log((bits.float() + 0.5) * 2.0**-24)


def _truncate(logp: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Set the log-probabilities of tokens outside top-k / top-p / min-p to -inf. logp: [S, V]."""
    S, V = logp.shape
    out = logp
    if b.any_top_k or b.any_top_p:
        sorted_lp = logp.sort(dim=-1, descending=True).values  # [S, V]
        k = torch.where(b.top_k > 0, b.top_k.clamp(max=V), V)  # [S]
        keep = k
        if b.any_top_p:
            probs = sorted_lp.exp() * (torch.arange(V, device=logp.device) < k.unsqueeze(-1))  # [S, V]
            cum = probs.cumsum(-1)
            before = cum - probs  # mass strictly ahead of each token
            keep = torch.minimum(k, (before < b.top_p.unsqueeze(-1) * cum[:, -1:]).sum(-1))
        cut = sorted_lp.gather(-1, (keep - 1).unsqueeze(-1))  # [S, 1]
        out = out.masked_fill(logp < cut, float("-inf"))
    if b.any_min_p:
        floor = logp.max(-1, keepdim=True).values + torch.log(b.min_p).unsqueeze(-1)  # [S, 1]; log 0 = -inf
        out = out.masked_fill(logp < floor, float("-inf"))
    return out


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (tokens [S] int64, logprobs [S] float32).

    Args:
        logits: [S, V] next-token logits (any float dtype; sampling runs in float32).
        b: The rows' parameters.
    """
    logits = logits.float()
    if b.all_greedy:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    greedy = b.temperature <= 0
    scale = torch.where(greedy, torch.ones_like(b.temperature), b.temperature)
    logp = torch.log_softmax(logits / scale.unsqueeze(-1), -1)  # [S, V], what is reported
    noise = torch.empty_like(logp).exponential_()  # [S, V]
    if b.seeded_rows is not None:
        noise[b.seeded_rows] = seeded_exponential(b.seeds, b.positions, logp.shape[-1])
    tokens = (_truncate(logp, b) - noise.log()).argmax(-1)
    tokens = torch.where(greedy, logits.argmax(-1), tokens)
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
