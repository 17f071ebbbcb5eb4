"""The Markdown summary of an evaluation's results document (written next to its JSON).

The document (`agentrl eval` writes it; docs/evaluation.md describes every field) holds the
settings, one entry per evaluated model with one summary per env (`results.summarize`), for a
comparison the paired differences per env (`results.compare`), and every episode.
"""

from __future__ import annotations

import math
from typing import Any

# Rows of the means table, in this order; pass@j and maj@k rows are placed after success_rate.
MEAN_LABELS = {
    "success_rate": "success rate",
    "reward_mean": "reward (mean per episode)",
    "turns_mean": "model turns (mean per episode)",
    "tool_calls_mean": "tool calls (mean per episode)",
    "tool_errors_mean": "tool errors (mean per episode)",
    "response_tokens_mean": "tokens the model wrote (mean per episode)",
    "tokens_mean": "tokens in the episode (mean per episode)",
}


def metric_order(names: list[str]) -> list[str]:
    """success_rate, pass@1.., maj@k, then the per-episode means (the order of the tables)."""
    passes = sorted((n for n in names if n.startswith("pass@")), key=lambda n: int(n[5:]))
    majs = [n for n in names if n.startswith("maj@")]
    rest = [n for n in MEAN_LABELS if n != "success_rate"]
    return [n for n in dict.fromkeys(["success_rate", *passes, *majs, *rest]) if n in names]


def label(name: str) -> str:
    if name.startswith("pass@"):
        return f"{name} (unbiased)"
    if name.startswith("maj@"):
        return f"{name} (majority vote)"
    return MEAN_LABELS.get(name, name)


def number(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:,.0f}"


def interval(ci: list[float]) -> str:
    return f"[{number(ci[0])}, {number(ci[1])}]"


def _means_table(summary: dict[str, Any]) -> list[str]:
    rows = ["| metric | value | 95% CI over tasks | tasks |", "|---|---:|---:|---:|"]
    for name in metric_order(list(summary["means"])):
        m = summary["means"][name]
        rows.append(f"| {label(name)} | {number(m['value'])} | {interval(m['ci'])} | {m['tasks']} |")
    return rows


def _totals_table(summary: dict[str, Any]) -> list[str]:
    rows = ["| total over all episodes | count |", "|---|---:|"]
    rows += [f"| {name} | {int(v)} |" for name, v in summary["totals"].items()]
    return rows


def _compare_table(diffs: dict[str, Any], a: str, b: str) -> list[str]:
    rows = [f"| metric | A: {a} | B: {b} | A - B | 95% paired CI | significant | tasks |",
            "|---|---:|---:|---:|---:|:---:|---:|"]
    for name in metric_order(list(diffs)):
        d = diffs[name]
        rows.append(f"| {label(name)} | {number(d['a'])} | {number(d['b'])} | {d['diff']:+.3f} | {interval(d['ci'])} "
                    f"| {'yes' if d['significant'] else 'no'} | {d['tasks']} |")
    return rows


def markdown_summary(doc: dict[str, Any]) -> str:
    """The results document as Markdown: settings, a means and a totals table per model and env, comparisons."""
    s = doc["settings"]
    out = [f"# agentrl eval: {' vs '.join(m['name'] for m in doc['models'])}", "",
           f"Split `{s['split']}`, {s['num_tasks']} tasks (seeds 0..{s['num_tasks'] - 1}), k={s['k']} samples per "
           f"task at temperature {s['temperature']:g}, sampling seed {s['seed']}. Means are over tasks of per-task "
           "values (a task's pass@k, or the mean over its samples); intervals are 95% percentile bootstraps over "
           f"tasks ({s['resamples']} resamples). Totals count every episode.", ""]
    if s["k"] > 1 and s["temperature"] == 0:
        out += ["Note: temperature 0 samples the same episode k times, so pass@k equals pass@1.", ""]
    for i, model in enumerate(doc["models"]):
        where = f" (step {model['step']})" if model.get("step") is not None else ""
        out += [f"## {'AB'[i] + ': ' if len(doc['models']) > 1 else ''}{model['name']}{where}", "",
                f"`{model['given']}`", ""]
        for env_id, summary in model["envs"].items():
            out += [f"### {env_id}", "", *_means_table(summary), "", *_totals_table(summary), ""]
            if summary.get("maj_keys_consistent") is False:
                out += ["Warning: some answer keys of this env went with both correct and wrong episodes, so "
                        "maj@k counts such an answer by its share of correct episodes.", ""]
    if doc.get("compare"):
        a, b = (m["name"] for m in doc["models"])
        out += ["## Paired comparison (A - B, same tasks and sampling seeds)", ""]
        for env_id, diffs in doc["compare"].items():
            out += [f"### {env_id}", "", *_compare_table(diffs, a, b), ""]
    return "\n".join(out).rstrip() + "\n"
