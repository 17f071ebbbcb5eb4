"""What `agentrl eval` and `agentrl report` do between parsing their arguments and printing.

`agentrl eval` takes a YAML config or a policy (run directory, checkpoint or model directory) and
works out the config, the policies and the settings (`eval_inputs`); the tables it prints are
built here too (`result_tables`), so `cli.py` stays a list of commands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from agentrl.config import Config, load_config
from agentrl.driver.evaluation import EvalSettings, file_name
from agentrl.driver.policy_source import PolicySource, resolve_policy
from agentrl.errors import ConfigError
from agentrl.eval.markdown import interval, label, metric_order, number


def _config_for(target: str | None, source: PolicySource | None, overrides: Sequence[str], envs: Sequence[str]) -> Config:
    """The config: the YAML file given, else the run's own config.json, else one built around a bare model."""
    if target is not None and Path(target).is_file():
        return load_config(target, list(overrides))
    if source is not None and source.run_dir is not None:
        return load_config(source.run_dir / "config.json", list(overrides))
    if not envs:
        raise ConfigError(f"{target!r} is a model directory without a run config, so the env is unknown; pass "
                          "--env ENV_ID (e.g. --env calculator-v0) or a YAML config")
    assert source is not None
    # JSON strings are YAML strings: a path or id holding ':' or '#' stays one plain value.
    return load_config(None, [f"model.path={json.dumps(source.model_dir)}", f"env.id={json.dumps(envs[0])}",
                              *overrides])


def eval_inputs(target: str | None, overrides: Sequence[str], model: str | None, compare: Sequence[str | None],
                envs: Sequence[str], split: str | None, k: int, tasks: int | None,
                ) -> tuple[Config, list[PolicySource], EvalSettings]:
    """(config, the one or two policies, settings) from `agentrl eval`'s arguments; input errors are ConfigErrors."""
    pair = [c for c in compare if c is not None]
    if pair and model is not None:
        raise ConfigError("--model and --compare both name what to evaluate; pass --compare A B alone")
    if target is None and not pair:
        raise ConfigError("nothing to evaluate: give a config, a run directory, a checkpoint or a model directory "
                          "(or --compare A B)")
    is_file = target is not None and Path(target).is_file()
    own = resolve_policy(target, "the policy") if target is not None and not is_file else None
    sources = [resolve_policy(p, "--compare") for p in pair] if pair else (
        [resolve_policy(model)] if model is not None else [own] if own is not None else [])
    cfg = _config_for(target, own or (sources[0] if sources else None), overrides, envs)
    if not sources:  # a YAML config alone: its model.path
        sources = [resolve_policy(cfg.model.path, "model.path")]
    ev = cfg.eval
    num_tasks = tasks if tasks is not None else ev.num_tasks
    if num_tasks == 0:
        raise ConfigError("eval.num_tasks=0: there is nothing to evaluate; set eval.num_tasks=N or pass --tasks N")
    env_ids = tuple(dict.fromkeys(envs)) if envs else tuple(dict.fromkeys(e.id for e in cfg.envs or (cfg.env,)))
    settings = EvalSettings(envs=env_ids, split=split if split is not None else ev.split, num_tasks=num_tasks, k=k,
                            temperature=ev.temperature, seed=ev.seed)
    return cfg, sources, settings


def default_prefix(sources: Sequence[PolicySource], s: EvalSettings) -> Path:
    """Where results go unless --out says: RUN/eval/ for a run's policy, else ./eval-results/."""
    first = sources[0]
    where = first.run_dir / "eval" if first.run_dir is not None else Path("eval-results")
    names = [file_name(src.name) for src in sources]
    stem = f"compare-{names[0]}-vs-{names[1]}" if len(names) == 2 else names[0]
    return where / f"{stem}-{s.split}-k{s.k}"


def result_tables(doc: dict) -> list[Table]:
    """One table per policy and env (means with intervals, then totals), and one per env comparing two."""
    tables = []
    for model in doc["models"]:
        for env_id, summary in model["envs"].items():
            t = Table(title=f"{model['name']} on {env_id}/{doc['settings']['split']} "
                            f"({summary['tasks']} tasks, k={doc['settings']['k']})")
            t.add_column("mean over tasks")
            t.add_column("value", justify="right")
            t.add_column("95% CI", justify="right")
            for name in metric_order(list(summary["means"])):
                m = summary["means"][name]
                t.add_row(label(name), number(m["value"]), interval(m["ci"]))
            counts = "  ".join(f"{k}={int(v)}" for k, v in summary["totals"].items() if v)
            t.caption = f"totals over all episodes: {counts}"
            tables.append(t)
    for env_id, diffs in (doc.get("compare") or {}).items():
        a, b = (m["name"] for m in doc["models"])
        t = Table(title=f"A - B on {env_id}: A={a}, B={b} (paired: same tasks, same sampling seeds)")
        for col in ("metric", "A", "B", "A - B", "95% paired CI", "significant"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for name in metric_order(list(diffs)):
            d = diffs[name]
            t.add_row(label(name), number(d["a"]), number(d["b"]), f"{d['diff']:+.3f}", interval(d["ci"]),
                      "[bold green]yes[/]" if d["significant"] else "no")
        tables.append(t)
    return tables
