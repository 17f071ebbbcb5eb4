"""`agentrl eval`: k samples per held-out task of one or two policies, on the rollout side alone.

For each policy (`policy_source.resolve_policy`: a model directory, a checkpoint or a run) one
engine is loaded, with the checkpoint's weights copied in when there are any (no trainable copy of
the model, no optimizer), and every env is played with it: task seeds 0..num_tasks-1 of the split,
k samples each. Episode `task * k + j` samples with the stream the eval seed gives that index, so
two policies compared meet the same tasks with the same sampling seeds, and a run is repeatable
on CPU bit for bit. Failed episodes are retried by `failures.policy` like training ones; those
still failing are recorded and not scored.

The results document (`results_document`) holds the settings, per policy and env the summary of
`agentrl.eval.results.summarize`, the paired comparison for two policies, and every episode.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentrl.config import Config
from agentrl.driver.failures import FailureCounts, FailurePolicy, check_arrival, play_with_retries, settle
from agentrl.driver.policy_source import PolicySource
from agentrl.driver.preflight import build_env
from agentrl.driver.rollout_side import RolloutSide, load_renderer
from agentrl.driver.sinks import Sinks, TensorBoardSink, WandbSink, check_sinks
from agentrl.envs.registration import make
from agentrl.eval.estimators import RESAMPLES
from agentrl.eval.markdown import markdown_summary
from agentrl.eval.results import EpisodeOutcome, compare, summarize
from agentrl.rollout.agent_loop import EnvPool, EpisodeSpec
from agentrl.rollout.trajectory import Trajectory

# Episodes handed to the engine at once: enough to batch well, few enough for the progress bar to move.
EPISODES_PER_PLAY = 256
FINAL_TEXT_CHARS = 2000
Progress = Callable[[int], None]


@dataclass(frozen=True)
class EvalSettings:
    """What is evaluated: `num_tasks` tasks (seeds 0..num_tasks-1) of `split` in each env, `k` samples each."""

    envs: tuple[str, ...]
    split: str
    num_tasks: int
    k: int
    temperature: float
    seed: int

    @property
    def episodes(self) -> int:
        return len(self.envs) * self.num_tasks * self.k


def env_config(cfg: Config, env_id: str) -> Config:
    """`cfg` playing `env_id` alone (the config's kwargs go only with the config's own envs; of a
    multi-task config's entries with this id, the first)."""
    from agentrl.driver.tasks import for_env

    own = next((e for e in cfg.envs if e.id == env_id), cfg.env if env_id == cfg.env.id else None)
    if own is not None:
        return for_env(cfg, own)
    return for_env(cfg, cfg.env.model_copy(update={"id": env_id, "kwargs": {}}))


@contextlib.contextmanager
def open_sides(cfg: Config, source: PolicySource, s: EvalSettings) -> Iterator[dict[str, RolloutSide]]:
    """One rollout side per env, all on one engine loaded from `source` (closed at the end of the block).

    Every env is built and its failure policy checked, and the checkpoint read and verified, before
    the model loads.
    """
    split = [(s.split, "--split")]
    cfgs = {env_id: env_config(cfg, env_id) for env_id in s.envs}
    probes = {}
    try:
        for env_id, c in list(cfgs.items())[1:]:
            FailurePolicy.for_env(c.failures, env_id)
            probes[env_id] = build_env(env_id, c.env.kwargs)
        weights = source.weights()
        given = None if source.model_dir == cfg.model.path else source.model_dir  # errors then name model.path
        first = RolloutSide.open(cfgs[s.envs[0]], model_path=given, splits=split, server_logs=server_logs(source))
    except BaseException:
        for probe in probes.values():
            probe.close()
        raise
    sides = {s.envs[0]: first}
    try:
        if weights is not None:
            first.update_weights(weights, version=source.step or 0)
            del weights
        for env_id in list(probes):
            sides[env_id] = _side_for(first, cfgs[env_id], probes.pop(env_id), split)
        yield sides
    finally:
        for probe in probes.values():
            probe.close()
        for side in sides.values():
            (side.close if side is first else side.pool.close)()


def server_logs(source: PolicySource) -> str:
    """Where a launched engine server logs during eval: beside the results (RUN/eval/, else eval-results/)."""
    where = source.run_dir / "eval" if source.run_dir is not None else Path("eval-results")
    return str(where / "servers")


def _side_for(first: RolloutSide, cfg: Config, probe, split) -> RolloutSide:
    """A rollout side for another env on `first`'s engine (its own env pool and renderer)."""
    try:
        tokenizer, renderer = load_renderer(cfg, first.path, "--model", probe, split)
    except BaseException:
        probe.close()
        raise
    pool = EnvPool(lambda: make(cfg.env.id, **cfg.env.kwargs))
    pool.give(probe)
    return RolloutSide(cfg, first.path, tokenizer, first.engine, pool, renderer)


def play_env(side: RolloutSide, s: EvalSettings, progress: Progress | None = None) -> list[tuple[Trajectory, int]]:
    """Every (trajectory, sample) of one env, task by task, failed ones after their retries included.

    Raises `RolloutError` when fewer than failures.min_group_fraction of the tasks had a sound episode.
    """
    policy = FailurePolicy.for_env(side.cfg.failures, side.cfg.env.id)
    counts = FailureCounts()
    specs = [EpisodeSpec(seed=task, split=s.split, group_id=task, index=task * s.k + j)
             for task in range(s.num_tasks) for j in range(s.k)]
    per_play = max(s.k, EPISODES_PER_PLAY // s.k * s.k)  # whole tasks per play
    final: list[Trajectory] = []
    for start in range(0, len(specs), per_play):
        chunk = specs[start:start + per_play]
        final += play_with_retries(lambda sp: side.play(sp, s.temperature, s.seed), chunk, policy, counts)
        if progress is not None:
            progress(len(chunk))
    check_arrival(final, settle(final, policy, FailureCounts()), policy.min_group_fraction,
                  f"evaluation of {side.cfg.env.id} on split {s.split!r}", unit="tasks")
    return [(t, spec.index % s.k) for t, spec in zip(final, specs)]


def outcome(t: Trajectory, sample: int, side: RolloutSide) -> EpisodeOutcome:
    """What one episode came to, with the text of its last model turn."""
    r = side.renderer
    last = t.turn_spans[-1] if t.turn_spans else None
    text = r.decode(r.strip_end_of_turn(t.token_ids[last[0]:last[1]])) if last else ""
    return EpisodeOutcome(
        env_id=t.env_id, split=t.split, task=t.seed, sample=sample, reward=t.reward, success=t.success,
        answer=t.answer, turns=t.num_turns, tool_calls=t.tool_calls, tool_errors=dict(t.tool_errors),
        truncation=t.truncation, response_tokens=t.num_model_tokens, tokens=len(t.token_ids), failure=t.failure,
        error=t.error, final_text=text[:FINAL_TEXT_CHARS])


def evaluate_policy(cfg: Config, source: PolicySource, s: EvalSettings,
                    progress: Progress | None = None) -> dict[str, list[EpisodeOutcome]]:
    """env id -> every episode of `source` in that env."""
    out: dict[str, list[EpisodeOutcome]] = {}
    with open_sides(cfg, source, s) as sides:
        for env_id, side in sides.items():
            out[env_id] = [outcome(t, j, side) for t, j in play_env(side, s, progress)]
    return out


def results_document(sources: Sequence[PolicySource], played: Sequence[dict[str, list[EpisodeOutcome]]],
                     s: EvalSettings) -> dict[str, Any]:
    """The results of `sources` (one, or two to compare) as one JSON-ready document."""
    models = []
    for src, envs in zip(sources, played):
        models.append({"name": src.name, "given": src.given, "model_dir": src.model_dir, "step": src.step,
                       "checkpoint": str(src.checkpoint) if src.checkpoint else None,
                       "envs": {env_id: summarize(eps, s.k, s.seed) for env_id, eps in envs.items()}})
    doc: dict[str, Any] = {
        "format": 1, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"envs": list(s.envs), "split": s.split, "num_tasks": s.num_tasks, "k": s.k,
                     "temperature": s.temperature, "seed": s.seed, "resamples": RESAMPLES, "level": 0.95},
        "models": models}
    if len(played) == 2:
        doc["compare"] = {env_id: compare(played[0][env_id], played[1][env_id], s.k, s.seed) for env_id in s.envs}
    doc["episodes"] = [{"model": i, **asdict(o)} for i, envs in enumerate(played) for eps in envs.values() for o in eps]
    return doc


def _finite(x: Any) -> Any:
    """NaN (a metric no task could give) as null: JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_results(doc: dict[str, Any], prefix: Path) -> tuple[Path, Path]:
    """`PREFIX.json` (the document) and `PREFIX.md` (its summary); returns both paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    clean = _finite(doc)
    head = json.dumps({k: v for k, v in clean.items() if k != "episodes"}, indent=1, allow_nan=False)
    lines = ",\n".join(json.dumps(e, allow_nan=False) for e in clean.get("episodes", []))
    # One episode per line: the file stays readable and greppable with thousands of them.
    json_path.write_text(f"{head[:-2]},\n \"episodes\": [\n{lines}\n ]\n}}\n", encoding="utf-8")
    md_path.write_text(markdown_summary(_finite(doc)), encoding="utf-8")
    return json_path, md_path


def scalar_records(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(model name, a step record of its numbers) per model: `eval/<env>/<metric>` at the policy's step.

    Two compared models are named `A-<name>` and `B-<name>` (a model compared with itself stays two runs).
    """
    out = []
    pair = len(doc["models"]) == 2
    for i, model in enumerate(doc["models"]):
        record: dict[str, float] = {"step": float(model["step"] or 0)}
        for env_id, summary in model["envs"].items():
            record |= {f"eval/{env_id}/{name}": m["value"] for name, m in summary["means"].items()
                       if m["value"] is not None and math.isfinite(m["value"])}
            record |= {f"eval/{env_id}/totals/{name}": v for name, v in summary["totals"].items()}
        out.append((f"{'AB'[i]}-{model['name']}" if pair else model["name"], record))
    return out


def file_name(name: str) -> str:
    """A policy's name as one path component (`run/final` -> `run-final`)."""
    return name.replace("/", "-").replace("\\", "-")


def log_scalars(cfg: Config, doc: dict[str, Any], out_dir: Path) -> None:
    """The means and totals to TensorBoard (`OUT/tensorboard/<model>`) and wandb, as `cfg.metrics` asks."""
    check_sinks(cfg.metrics)
    for name, record in scalar_records(doc):
        sinks = []
        if cfg.metrics.tensorboard:
            sinks.append(TensorBoardSink(out_dir / "tensorboard" / file_name(name)))
        if cfg.metrics.wandb_project is not None:
            sinks.append(WandbSink(cfg, out_dir))
        with contextlib.closing(Sinks(sinks)) as all_sinks:
            all_sinks.write(record)
