"""What a step's episodes looked like: a sample saved for `agentrl report`, and whether they could teach anything.

`TrajectoryLog` writes `metrics.save_trajectories` episodes of every step to
`run_dir/trajectories/step-NNNNNN.jsonl`, one JSON object per episode (`episode_view`): the
rendered prompt, each model turn token by token with its logprob and loss mask, the tool calls the
env's parser read from it, each observation with the typed tool errors it reports, per-turn
rewards, the episode's advantage and whether it was trained on.

`learning_signal` counts the step's task groups whose rewards were all equal: a group-relative
advantage is zero for each of them, so when every group is like that the update learns nothing.
It then keeps a sample of what the model wrote (`no_signal_sample`), which the console shows, so
a user whose reward never moves sees why.

Letters: B rows (episodes) of a `TrainBatch`, T its longest row.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentrl.config import Config
from agentrl.driver.preflight import build_env
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.batch import TrainBatch

SAMPLE_CHARS = 300
_TOOL_ERROR = re.compile(r"Error \(([a-z_]+)\)")


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _turn_text(tokenizer, t: Trajectory, turn: int) -> str:
    start, end = t.turn_spans[turn]
    return tokenizer.decode(list(t.token_ids[start:end]), skip_special_tokens=True).strip()


def learning_signal(trajectories: Sequence[Trajectory], tokenizer) -> dict[str, Any]:
    """`reward_groups`, `uniform_reward_groups` (totals over the step's sound episodes) and, when
    every group is uniform, `no_signal_sample`: the rewards and the last turn of one episode."""
    rewards: dict[int, list[float]] = defaultdict(list)
    first: dict[int, Trajectory] = {}
    for t in trajectories:
        if t.failure is None:
            rewards[t.group_id].append(t.reward)
            first.setdefault(t.group_id, t)
    uniform = [g for g, r in rewards.items() if max(r) == min(r)]
    out: dict[str, Any] = {"reward_groups": float(len(rewards)), "uniform_reward_groups": float(len(uniform))}
    if rewards and len(uniform) == len(rewards):
        values = sorted({r[0] for r in rewards.values()})
        t = first[uniform[0]]
        said = _turn_text(tokenizer, t, len(t.turn_spans) - 1) if t.turn_spans else ""
        said = " ".join(said.split())
        out["no_signal_sample"] = (f"every reward was {', '.join(f'{v:g}' for v in values)} within its group; task "
                                   f"{t.task_id} ended ({t.truncation or 'answered'}) with: "
                                   f"{said[:SAMPLE_CHARS]!r}{'...' if len(said) > SAMPLE_CHARS else ''}")
    return out


def sample_rows(n: int, limit: int) -> list[int]:
    """`limit` row indices spread evenly over `n` rows (all of them when n <= limit)."""
    if n <= limit:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def _row_advantage(batch: TrainBatch | None, row: int) -> float | None:
    """Mean advantage over the row's trained tokens (one number per episode for outcome estimators)."""
    if batch is None:
        return None
    mask = batch.mask[row] > 0  # [T]
    return float(batch.advantages[row][mask].mean()) if bool(mask.any()) else None


def _finite(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _model_segment(tokenizer, t: Trajectory, turn: int, parse: Callable | None) -> dict[str, Any]:
    start, end = t.turn_spans[turn]
    tokens = [[_decode(tokenizer, [t.token_ids[i]]), _finite(t.rollout_logprobs[i]), t.loss_mask[i]]
              for i in range(start, end)]
    seg: dict[str, Any] = {"kind": "model", "turn": turn + 1, "tokens": tokens,
                           "reward": t.turn_rewards[turn] if turn < len(t.turn_rewards) else None}
    if parse is not None:
        try:
            parsed = parse(_decode(tokenizer, t.token_ids[start:end]))
            seg["calls"] = [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]
            seg["issues"] = [i.message for i in parsed.issues]
        except Exception as exc:  # noqa: BLE001 - the viewer shows the turn anyway
            seg["issues"] = [f"could not re-read the turn's tool calls: {type(exc).__name__}: {exc}"]
    return seg


def episode_view(t: Trajectory, tokenizer, parse: Callable | None = None, advantage: float | None = None,
                 trained: bool | None = None) -> dict[str, Any]:
    """One episode as the report's viewer shows it (see the module docstring); JSON-ready."""
    segments: list[dict[str, Any]] = [{"kind": "prompt", "text": _decode(tokenizer, t.token_ids[:t.prompt_length])}]
    for turn, (start, end) in enumerate(t.turn_spans):
        segments.append(_model_segment(tokenizer, t, turn, parse))
        after = t.turn_spans[turn + 1][0] if turn + 1 < len(t.turn_spans) else len(t.token_ids)
        if after > end:
            text = _decode(tokenizer, t.token_ids[end:after])
            segments.append({"kind": "observation", "text": text, "errors": _TOOL_ERROR.findall(text)})
    return {"env_id": t.env_id, "task_id": t.task_id, "group_id": t.group_id, "reward": t.reward,
            "success": t.success, "advantage": advantage, "trained": t.failure is None if trained is None else trained,
            "turns": t.num_turns, "tool_calls": t.tool_calls, "tool_errors": dict(t.tool_errors),
            "truncation": t.truncation, "failure": t.failure, "error": t.error, "turn_rewards": list(t.turn_rewards),
            "segments": segments}


class TrajectoryLog:
    """Saves `limit` episodes of each step to `run_dir/trajectories/step-NNNNNN.jsonl`.

    Args:
        run_dir: The run directory.
        tokenizer: The policy's tokenizer (to decode tokens for reading).
        parse: The env's tool-call parser (`ToolEnv.parse`), or None for envs without tools.
        limit: Episodes saved per step.
    """

    def __init__(self, run_dir: Path, tokenizer, parse: Callable | None, limit: int):
        self.dir = Path(run_dir) / "trajectories"
        self.tokenizer, self.parse, self.limit = tokenizer, parse, limit

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, tokenizer) -> TrajectoryLog | None:
        """The log `cfg.metrics.save_trajectories` asks for (None for 0), with a parser from a fresh env."""
        if cfg.metrics.save_trajectories == 0:
            return None
        env = build_env(cfg.env.id, cfg.env.kwargs)
        try:
            parse = getattr(env, "parse", None)  # a pure function of the text (ToolEnv binds it to its tools)
        finally:
            env.close()
        return cls(run_dir, tokenizer, parse if callable(parse) else None, cfg.metrics.save_trajectories)

    def write(self, step: int, trajectories: Sequence[Trajectory], batch: TrainBatch | None = None) -> Path:
        """Save the sample of step `step` (1-based); `batch` (rows in `trajectories`' order) gives advantages."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:06d}.jsonl"
        lines = []
        for row in sample_rows(len(trajectories), self.limit):
            t = trajectories[row]
            trained = bool(batch.mask[row].any()) if batch is not None else None
            view = episode_view(t, self.tokenizer, self.parse, _row_advantage(batch, row), trained)
            lines.append(json.dumps({"step": step, "row": row, **view}, allow_nan=False))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a file; a resumed run rewrites the steps it repeats
        return path
