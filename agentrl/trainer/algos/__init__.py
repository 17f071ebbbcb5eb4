"""The algorithm zoo: advantage estimators, policy losses, the critic's value loss, TIS correction and
dynamic sampling.

Each piece is a pure function over tensors; estimators and losses are also registered by name
(`get_advantage_estimator("grpo")`, `get_policy_loss("ppo_clip")`) so a config can pick them.
"""

from agentrl.trainer.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    TOKEN_REWARD_ESTIMATORS,
    dr_grpo,
    gae,
    get_advantage_estimator,
    grpo,
    masked_whiten,
    normalize_per_task,
    reinforce_pp,
    rloo,
)
from agentrl.trainer.algos.correction import TIS_LEVELS, tis_weights
from agentrl.trainer.algos.losses import (
    AGG_MODES,
    KL_KINDS,
    POLICY_LOSSES,
    aggregate_loss,
    cispo,
    entropy_from_logits,
    get_policy_loss,
    gspo,
    kl_penalty,
    masked_mean,
    ppo_clip,
)
from agentrl.trainer.algos.sampling import filter_uniform_groups
from agentrl.trainer.algos.turns import returns_to_go, turn_rewards, turn_rloo
from agentrl.trainer.algos.value import clipped_value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_KINDS",
    "POLICY_LOSSES",
    "TIS_LEVELS",
    "TOKEN_REWARD_ESTIMATORS",
    "aggregate_loss",
    "cispo",
    "clipped_value_loss",
    "dr_grpo",
    "entropy_from_logits",
    "filter_uniform_groups",
    "gae",
    "get_advantage_estimator",
    "get_policy_loss",
    "grpo",
    "gspo",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "normalize_per_task",
    "ppo_clip",
    "reinforce_pp",
    "returns_to_go",
    "rloo",
    "tis_weights",
    "turn_rewards",
    "turn_rloo",
]
