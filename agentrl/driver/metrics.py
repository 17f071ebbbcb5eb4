"""Per-step metrics: what a batch of episodes did, how stale the trained tokens were, and how fast
each role went. The names here are the keys of `metrics.jsonl`, TensorBoard and wandb alike.

How to read a key (docs/training.md lists them all):
  * `*_mean` is a mean per episode over the batch's played episodes; `success_rate` is a share of them;
  * a plain count (`episodes`, `episode_errors`, `tool_errors`) and a `group/name` counter
    (`tool_errors/<kind>`, `truncated/<reason>`, `failures/<class>`, `staleness/<k>`) is a total
    over the step;
  * `time/<role>/<phase>` are wall seconds (see `timing.py`), `tokens/<role>/<what>` token totals,
    `tokens_per_s/<role>/<what>` those totals over the role's own busy time.

Letters: B rows (episodes) of a `TrainBatch`, T its longest row, N trained tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from agentrl.errors import TrainerError
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.batch import TrainBatch

# Distinct episode-error texts kept per batch (in metrics.jsonl and on the console).
ERROR_SAMPLES = 3


def rollout_metrics(trajectories: Sequence[Trajectory], seconds: float,
                    use: EngineUse | None = None) -> dict[str, float]:
    """Reward, success, lengths, truncations and tool-error counts of one batch, and its rollout time and throughput.

    Args:
        trajectories: The episodes to summarise. A step or an evaluation passes those that ended sound (a
            failure's reward is not the policy's) and counts its failures apart (`failures.FailureCounts`).
        seconds: Wall time spent playing them.
        use: What the engine did meanwhile (`MeteredEngine.use()` after minus before); without it
            the engine/env split and the prompt tokens are left out.
    """
    n = max(len(trajectories), 1)
    generated = sum(t.num_model_tokens for t in trajectories)
    out: dict[str, float] = {
        "episodes": float(len(trajectories)),
        "reward_mean": sum(t.reward for t in trajectories) / n,
        "success_rate": sum(t.success for t in trajectories) / n,
        "turns_mean": sum(t.num_turns for t in trajectories) / n,
        "response_tokens_mean": generated / n,
        "tool_calls_mean": sum(t.tool_calls for t in trajectories) / n,
        "episode_errors": float(sum(t.error is not None for t in trajectories)),
    }
    errors: Counter[str] = Counter()
    truncations: Counter[str] = Counter()
    for t in trajectories:
        errors.update(t.tool_errors)
        if t.truncation:
            truncations[t.truncation] += 1
    out["tool_errors"] = float(sum(errors.values()))
    for kind, count in sorted(errors.items()):
        out[f"tool_errors/{kind}"] = float(count)
    for reason, count in sorted(truncations.items()):
        out[f"truncated/{reason}"] = float(count)
    return out | rollout_time_metrics(seconds, use, generated)


def rollout_time_metrics(seconds: float, use: EngineUse | None, generated: int) -> dict[str, float]:
    """`time/rollout/{episodes,engine,env}`, the rollout's token totals and tokens per second.

    engine: wall time with at least one request in flight; env: the rest of `seconds`, when every
    live episode was in an env step, a tool call or chat rendering (the engine sat idle).
    """
    out = {"time/rollout/episodes": seconds}
    if use is not None:
        engine = min(use.busy_s, seconds)
        generated = use.generated_tokens
        out |= {"time/rollout/engine": engine, "time/rollout/env": seconds - engine,
                "tokens/rollout/prompt": float(use.prompt_tokens),
                "tokens/rollout/prompt_cached": float(use.prompt_cached_tokens),
                "tokens_per_s/rollout/prompt": _rate(use.prompt_tokens, seconds)}
    return out | {"tokens/rollout/generated": float(generated),
                  "tokens_per_s/rollout/generated": _rate(generated, seconds)}


def trainer_metrics(batch: TrainBatch, update_s: float) -> dict[str, float]:
    """Tokens the update trained on (the loss mask) and processed (every token of a row with any
    trained token: the forward pass runs over the prompt and observations too), and both per second."""
    trained_rows = batch.mask.sum(1) > 0  # [B]
    trained = int(batch.mask.sum())
    processed = int(batch.lengths[trained_rows].sum())
    return {"tokens/trainer/trained": float(trained), "tokens/trainer/processed": float(processed),
            "tokens_per_s/trainer/trained": _rate(trained, update_s),
            "tokens_per_s/trainer/processed": _rate(processed, update_s)}


def staleness_metrics(weight_versions: torch.Tensor, mask: torch.Tensor, policy_version: int) -> dict[str, float]:
    """Histogram of how many updates behind the policy being updated each trained token was sampled.

    A token's staleness is `policy_version - weight_versions` (0 when the engine had the weights
    being updated, as in every synchronous step). `staleness/<k>` counts trained tokens k versions
    behind (only the k that occur), `staleness/mean` and `staleness/max` summarise them.

    Args:
        weight_versions: [B, T] version that sampled each next token (-1 off the mask).
        mask: [B, T] 1 where the next token is trained on.
        policy_version: Updates the trained policy has had before this one.

    Raises:
        TrainerError: a trained token without a version, or from a version newer than the policy's:
            the version bookkeeping is broken, and off-policy corrections built on it would be wrong.
    """
    versions = weight_versions[mask > 0]  # [N]
    if versions.numel() == 0:
        return {}
    if int(versions.min()) < 0 or int(versions.max()) > policy_version:
        raise TrainerError(f"trained tokens carry weight versions {int(versions.min())}..{int(versions.max())}, "
                           f"outside 0..{policy_version} (the policy being updated is version {policy_version}): "
                           "the engine's version bookkeeping is broken; this is a bug in agentrl, please report it")
    stale = policy_version - versions  # [N]
    out = {f"staleness/{k}": float(c) for k, c in enumerate(torch.bincount(stale).tolist()) if c}
    return out | {"staleness/mean": float(stale.double().mean()), "staleness/max": float(stale.max())}


# What a key of a step or evaluation record is, by name (the first rule that matches).
_MEANING = (
    (lambda k: k == "success_rate", "share of the sound episodes with reward > 0"),
    (lambda k: k.endswith("_mean") and "/" not in k, "mean per sound episode"),
    (lambda k: k.startswith("time/"), "wall seconds"),
    (lambda k: k.startswith("tokens_per_s/"), "tokens per second of the role's busy time"),
    (lambda k: k.startswith("tokens/"), "total tokens over the step"),
    (lambda k: k in ("staleness/mean", "staleness/max"), "over the step's trained tokens"),
    (lambda k: k in ("loss", "grad_norm", "entropy", "approx_kl", "clip_frac", "ratio_mean", "kl_ref")
     or k.startswith("tis_"), "per-token mean over the trained tokens of the step's last optimizer step"),
    (lambda k: k == "nonfinite_steps", "total over the run so far"),
    (lambda k: k == "step", "steps done"),
    (lambda k: k.startswith(("failures/", "tool_errors", "truncated/", "staleness/")) or k in (
        "episodes", "episode_errors", "scored_tasks", "reward_groups", "uniform_reward_groups", "trained_episodes",
        "kept_groups", "sampling_rounds", "trained_tokens"), "total over the step (or the evaluation)"),
)


def key_meaning(key: str) -> str | None:
    """Whether a metrics key is a mean per episode, a share, a total, seconds, ... (None when no rule knows it)."""
    return next((text for rule, text in _MEANING if rule(key)), None)


def run_summary(result: dict) -> dict:
    """`summary.json`: the evaluations before and after training, the last step's metrics, and what each key means."""
    out = {k: v for k, v in result.items() if k not in ("history",) and v is not None}
    if result.get("history"):
        out["last_step"] = result["history"][-1]
    keys = sorted({k for part in ("before", "after", "last_step") for k in out.get(part, {})})
    out["meaning"] = {k: m for k in keys if (m := key_meaning(k)) is not None}
    return out


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def error_samples(trajectories: Sequence[Trajectory], limit: int = ERROR_SAMPLES) -> list[str]:
    """The first `limit` distinct episode-error texts of a batch, most frequent first, each on one line
    with its count: `["12x EnvError: unknown split 'tset'; ...", ...]`."""
    counts = Counter(" ".join(t.error.split()) for t in trajectories if t.error is not None)
    return [f"{n}x {text}" for text, n in counts.most_common(limit)]
