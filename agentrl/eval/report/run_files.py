"""Reading a run directory for the report: metrics, summary, evaluations and saved trajectories.

Nothing here trusts the files: a line that is not JSON, or a results file of another shape, is
skipped and named in `RunFiles.problems` (the report shows them), so a run that crashed mid-write
still gets its report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError

# Episodes the viewer embeds at most (spread over the saved steps): each holds its tokens, so a long
# run's full sample would make a page too heavy to open.
MAX_EPISODES = 80


@dataclass
class RunFiles:
    """What a run directory holds, as plain data."""

    path: Path
    config: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # step records of metrics.jsonl, in order
    events: list[dict[str, Any]] = field(default_factory=list)  # its event records (eval_before, error, ...)
    summary: dict[str, Any] | None = None
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (file name, results document)
    episodes: list[dict[str, Any]] = field(default_factory=list)  # saved trajectories (episode views)
    episodes_saved: int = 0  # before the MAX_EPISODES cap
    problems: list[str] = field(default_factory=list)


def _json_lines(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name} line {n} is not JSON ({exc.msg}); skipped")
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _json_file(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} could not be read ({type(exc).__name__}); skipped")
        return None


def _spread(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def read_run(run_dir: str | Path) -> RunFiles:
    """Everything the report shows of `run_dir`.

    Raises:
        ConfigError: `run_dir` is not a directory, or holds neither metrics.jsonl nor config.json.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} does not exist or is not a directory; give the run_dir "
                          "of a run (`agentrl train` writes metrics.jsonl there)")
    if not (path / "metrics.jsonl").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} holds no metrics.jsonl or config.json, so it is not a run directory; give "
                          "the run_dir of a run")
    run = RunFiles(path)
    if (path / "config.json").is_file():
        config = _json_file(path / "config.json", run.problems)
        run.config = config if isinstance(config, dict) else None
    if (path / "metrics.jsonl").is_file():
        for record in _json_lines(path / "metrics.jsonl", run.problems):
            if "event" in record:
                run.events.append(record)
            elif isinstance(record.get("step"), (int, float)):
                run.steps.append(record)
    if (path / "summary.json").is_file():
        summary = _json_file(path / "summary.json", run.problems)
        run.summary = summary if isinstance(summary, dict) else None
    for results in sorted((path / "eval").glob("*.json")) if (path / "eval").is_dir() else []:
        doc = _json_file(results, run.problems)
        if isinstance(doc, dict) and isinstance(doc.get("models"), list) and isinstance(doc.get("settings"), dict):
            run.evals.append((results.name, doc))
        elif doc is not None:
            run.problems.append(f"eval/{results.name} is not an `agentrl eval` results file; skipped")
    saved: list[dict[str, Any]] = []
    for step_file in sorted((path / "trajectories").glob("step-*.jsonl")) if (path / "trajectories").is_dir() else []:
        saved += [e for e in _json_lines(step_file, run.problems) if isinstance(e.get("segments"), list)]
    run.episodes_saved = len(saved)
    run.episodes = _spread(saved, MAX_EPISODES)
    return run
