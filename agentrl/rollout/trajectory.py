"""`Trajectory`: one episode as the trainer sees it.

Letters: T = number of tokens of the episode. Every per-token field has length T and lines up
with `token_ids`: `loss_mask[i]` is 1 exactly when token i was sampled by the model,
`rollout_logprobs[i]` is the engine's logprob of that token (0 elsewhere) and
`weight_versions[i]` the policy version that sampled it (-1 for prompt and observation tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Trajectory:
    """A finished (or truncated, or failed) episode."""

    token_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    rollout_logprobs: tuple[float, ...]
    weight_versions: tuple[int, ...]
    prompt_length: int
    turn_spans: tuple[tuple[int, int], ...]  # [start, end) of each model turn in token_ids
    turn_rewards: tuple[float, ...]
    reward: float
    env_id: str
    task_id: str
    split: str
    seed: int
    group_id: int
    num_turns: int
    truncation: str | None = None  # max_turns | max_total_tokens | max_tokens_per_turn | abort | None
    error: str | None = None  # an env or engine failure; the episode is kept as data with reward 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    tool_calls: int = 0

    def __post_init__(self):
        n = len(self.token_ids)
        for name in ("loss_mask", "rollout_logprobs", "weight_versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries for {n} tokens")

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def success(self) -> bool:
        return self.reward > 0 and self.error is None
