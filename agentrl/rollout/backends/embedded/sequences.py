"""What the scheduler plans with: a request's state (`Sequence`), its work in one step (`Chunk`),
and one step's plan (`StepPlan`). Plain data; `scheduler.py` decides, `step_inputs.py` and
`cuda_graphs.py` turn plans into tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    """One request's state. `tokens` is prompt + output so far; KV exists for `tokens[:num_computed]`."""

    seq_id: int
    tokens: list[int]
    max_new: int
    stop_token_ids: frozenset[int] = frozenset()
    stop_check: Callable[[Sequence], bool] | None = None
    payload: object = None
    prompt_len: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_registered: int = 0
    cached_tokens: int = -1
    row: int = -1
    cacheable: bool = True
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    queued_at: int = 0  # the scheduler's step count when it last joined the waiting queue

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.tokens)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Chunk:
    """Work for one sequence in one step: compute `tokens[start:start + n]`, then maybe sample."""

    seq: Sequence
    start: int
    n: int
    sample: bool
    logits_from: Sequence | None = None  # a fork samples from its parent's last-token logits


@dataclass
class StepPlan:
    chunks: list[Chunk]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy after the forward
    admitted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)
