"""A training step on the console: two lines, a third when something failed, a fourth when it taught nothing.

    step    3  reward_mean=0.417  success_rate=0.5  loss=0.0123  grad_norm=0.81  nonfinite_steps=0
               time 2.31s: rollout 1.20s (engine 0.90 env 0.30) score 0.05s update 0.40s sync 0.01s ckpt 0.00s
               | idle: rollout 1.10s trainer 1.85s | tok/s: generated 850 trained 2400 | staleness max 0 mean 0.00
               failures: engine_timeout=2 | tool errors: parse=3
               no learning signal: all 16 task groups had equal rewards ...; task train-17 ended with: '...'

(the time line is one line on the console). The first line's keys are `metrics.console_keys`; the
time line reads the `time/*` keys of whatever roles are present, so workers reporting roles of their
own show up without changes here; the failure line shows every non-zero `failures/<class>` and
`tool_errors/<kind>` (totals over the step), whatever the class. `LEGEND` is printed once before
the first step: it says which numbers are means per episode and which are totals.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

LEGEND = ("how to read a step: *_mean = mean per episode and success_rate = share of episodes (both over the "
          "step's sound episodes); counts (episodes, tool errors, failures) = totals over the step; time in wall "
          "seconds; tok/s = tokens per second of the role's busy time")

# Phases on the time line, in step order: (metrics key, label).
_PHASES = (("time/trainer/score", "score"), ("time/trainer/update", "update"),
           ("time/trainer/weight_sync", "sync"), ("time/trainer/checkpoint", "ckpt"))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def step_lines(step: int, m: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The console lines of one step's metrics (plain text; the caller escapes any markup)."""
    head = "  ".join(f"{k}={m[k]:.3g}" for k in keys if _is_number(m.get(k)))
    lines = [f"step {step:>4}  {head}".rstrip()]
    timing = time_line(m)
    if timing:
        lines.append(f"           {timing}")
    problems = problem_line(m)
    if problems:
        lines.append(f"           {problems}")
    if isinstance(m.get("no_signal_sample"), str):
        groups = int(m.get("reward_groups", 0))
        lines.append(f"           no learning signal: all {groups} task group(s) had equal rewards, so every "
                     f"advantage is 0 and this update learns nothing; {m['no_signal_sample']}")
    return lines


def time_line(m: Mapping[str, Any]) -> str:
    """`time 2.31s: rollout 1.20s (engine 0.90 env 0.30) score ... | idle: ... | tok/s: ... | staleness ...`."""
    if not _is_number(m.get("time/step")):
        return ""
    parts = []
    if _is_number(m.get("time/rollout/episodes")):
        split = (f" (engine {m['time/rollout/engine']:.2f} env {m['time/rollout/env']:.2f})"
                 if _is_number(m.get("time/rollout/engine")) else "")
        parts.append(f"rollout {m['time/rollout/episodes']:.2f}s{split}")
    parts += [f"{label} {m[key]:.2f}s" for key, label in _PHASES if _is_number(m.get(key))]
    idle = [(k.split("/")[1], v) for k, v in m.items() if k.startswith("time/") and k.endswith("/idle")]
    sections = [f"time {m['time/step']:.2f}s" + (": " + " ".join(parts) if parts else "")]
    if idle:
        sections.append("idle: " + " ".join(f"{role} {v:.2f}s" for role, v in idle))
    rates = [(label, m.get(key)) for key, label in (("tokens_per_s/rollout/generated", "generated"),
                                                    ("tokens_per_s/trainer/trained", "trained"))]
    if any(_is_number(v) for _, v in rates):
        sections.append("tok/s: " + " ".join(f"{label} {v:.0f}" for label, v in rates if _is_number(v)))
    if _is_number(m.get("staleness/max")):
        sections.append(f"staleness max {m['staleness/max']:.0f} mean {m['staleness/mean']:.2f}")
    return " | ".join(sections)


def problem_line(m: Mapping[str, Any]) -> str:
    """Non-zero failure and tool-error counts: `failures: engine_timeout=2 | tool errors: parse=3`, or ""."""
    sections = []
    for prefix, label in (("failures/", "failures"), ("tool_errors/", "tool errors")):
        counts = [f"{k.removeprefix(prefix)}={int(v)}" for k, v in sorted(m.items())
                  if k.startswith(prefix) and _is_number(v) and v]
        if counts:
            sections.append(f"{label}: " + " ".join(counts))
    return " | ".join(sections)


class ConsoleSink:
    """Step records as `step_lines` through `print_line` (events are left to their own messages)."""

    def __init__(self, print_line: Callable[[str], None], keys: Sequence[str]):
        self.print_line = print_line
        self.keys = keys

    def write(self, record: Mapping[str, Any]) -> None:
        if "event" not in record and "step" in record:
            for line in step_lines(int(record["step"]), record, self.keys):
                self.print_line(line)

    def close(self) -> None:
        pass
