"""`Trajectory`: one episode as the trainer sees it, and the classes of failure an episode can end in.

Letters: T = number of tokens of the episode. Every per-token field has length T and lines up
with `token_ids`: `loss_mask[i]` is 1 exactly when token i was sampled by the model,
`rollout_logprobs[i]` is the engine's logprob of that token (0 elsewhere) and
`weight_versions[i]` the policy version that sampled it (-1 for prompt and observation tokens).

What the policy caused (a malformed tool call, a wrong answer, running out of turns or tokens)
is an ordinary ending: `truncation`, `tool_errors` and the env's reward say what happened, and it
is trained on. What the infrastructure caused is a *failure*: `failure` names its class and
`error` keeps its text; the driver retries, drops or masks it by class (see
`agentrl.driver.failures`) and never trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Why an episode failed, when it was not the policy's doing. Each class has a policy
#: (`failures.policy.<class>` in the config; see docs/training.md).
FAILURE_CLASSES = (
    "env_error",            # the env raised, or broke its contract (a NaN reward, ...)
    "engine_error",         # the inference engine raised on a request (or the engine died)
    "engine_timeout",       # one engine request passed failures.request_timeout_s
    "tool_infrastructure",  # a tool or sandbox fault outlived its retries (InfrastructureFault)
    "template_refused",     # the chat template refused this episode's conversation
    "episode_deadline",     # the episode passed failures.episode_timeout_s (a hung tool or env)
    "worker_lost",          # the rollout worker playing it died (made by the driver: `failed_trajectory`)
)


@dataclass(frozen=True)
class Trajectory:
    """A finished (or truncated, or failed) episode.

    `failure` is None for an episode that ended as the policy played it, else one of
    `FAILURE_CLASSES`; `error` holds its text exactly when `failure` is set.
    """

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
    truncation: str | None = None  # max_turns | max_total_tokens | max_tokens_per_turn | abort | env | error | None
    error: str | None = None  # the failure's text (an exception, a timeout, ...); the reward is then 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    tool_calls: int = 0
    failure: str | None = None  # one of FAILURE_CLASSES when the infrastructure, not the policy, ended it
    answer: str | None = None  # the env's answer key for the final answer (`info["answer_key"]`), for maj@k
    # Tool errors by kind that each env step reported, one entry per entry of `turn_rewards`
    # (the per-turn part of `tool_errors`; a configured penalty lands on that turn's last token).
    turn_tool_errors: tuple[dict[str, int], ...] = ()

    def __post_init__(self):
        n = len(self.token_ids)
        for name in ("loss_mask", "rollout_logprobs", "weight_versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries for {n} tokens")
        if self.failure is not None and self.failure not in FAILURE_CLASSES:
            raise ValueError(f"Trajectory.failure {self.failure!r} is not one of {FAILURE_CLASSES}")
        if len(self.turn_rewards) > len(self.turn_spans):
            raise ValueError(f"Trajectory has {len(self.turn_rewards)} turn rewards for {len(self.turn_spans)} turns")
        if self.turn_tool_errors and len(self.turn_tool_errors) != len(self.turn_rewards):
            raise ValueError(f"Trajectory.turn_tool_errors has {len(self.turn_tool_errors)} entries for "
                             f"{len(self.turn_rewards)} turn rewards")
        if (self.failure is None) != (self.error is None):
            raise ValueError("a Trajectory has a failure class exactly when it has an error text "
                             f"(got failure={self.failure!r}, error={self.error!r})")

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def success(self) -> bool:
        return self.reward > 0 and self.error is None
