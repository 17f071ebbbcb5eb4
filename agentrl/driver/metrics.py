"""Per-step metrics: summaries of a rollout batch, and a JSONL writer for the run directory."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentrl.rollout.trajectory import Trajectory

# Distinct episode-error texts kept per batch (in metrics.jsonl and on the console).
ERROR_SAMPLES = 3


def rollout_metrics(trajectories: Sequence[Trajectory], seconds: float) -> dict[str, float]:
    """Reward, success, lengths, truncations and tool-error counts of one batch."""
    n = max(len(trajectories), 1)
    generated = sum(t.num_model_tokens for t in trajectories)
    out: dict[str, float] = {
        "reward": sum(t.reward for t in trajectories) / n,
        "success_rate": sum(t.success for t in trajectories) / n,
        "turns": sum(t.num_turns for t in trajectories) / n,
        "response_tokens": generated / n,
        "tool_calls": sum(t.tool_calls for t in trajectories) / n,
        "episode_errors": float(sum(t.error is not None for t in trajectories)),
        "rollout_tokens_per_s": generated / seconds if seconds > 0 else 0.0,
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
    return out


def error_samples(trajectories: Sequence[Trajectory], limit: int = ERROR_SAMPLES) -> list[str]:
    """The first `limit` distinct episode-error texts of a batch, most frequent first, each on one line
    with its count: `["12x EnvError: unknown split 'tset'; ...", ...]`."""
    counts = Counter(" ".join(t.error.split()) for t in trajectories if t.error is not None)
    return [f"{n}x {text}" for text, n in counts.most_common(limit)]


class MetricsWriter:
    """Appends one JSON object per line to `path` (the run's `metrics.jsonl`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
