"""Line charts as inline SVG, drawn here so the report needs no plotting library and no network.

A chart is an `<svg>` with axes, "nice" ticks, one polyline per series, a circle per point whose
`<title>` shows the exact value on hover, and a legend. Which charts a run gets is `CHARTS`: each
takes the metrics keys it names that the run has, so runs with other keys (Ray roles, new failure
classes) get their curves without changes here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
W, H = 520, 240
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 14, 34


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]  # (step, value), steps ascending


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About `count` round tick values from at most `lo` to at least `hi` (steps of 1, 2 or 5 times a
    power of ten; whole numbers only when `integer`)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[0] + len(ticks) * step)
    return [round(t, 12) for t in ticks]


def tick_text(t: float, ticks: Sequence[float]) -> str:
    """A tick label with as many decimals as the tick spacing needs (`5.4e-09` style for tiny or huge scales)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(t) or 1.0
    if t == 0:
        return "0"
    if step < 1e-3 or abs(t) >= 1e6:
        return f"{t:.{max(1, min(6, 1 - math.floor(math.log10(step)) + math.floor(math.log10(abs(t)))))}g}"
    return f"{t:.{max(0, -math.floor(math.log10(step)))}f}"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart(chart_id: str, title: str, series: Sequence[Series], unit: str = "") -> str:
    """One chart as an SVG element; `series` with no points are left out (the caller skips empty charts)."""
    drawn = [s for s in series if s.points]
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    xt = nice_ticks(min(xs), max(xs), 6, integer=True)
    yt = nice_ticks(min(ys + [0.0]) if min(ys) >= 0 and min(ys) < 0.3 * max(ys) else min(ys), max(ys), 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return TOP + ph - (y - y0) / ((y1 - y0) or 1) * ph

    parts = [f'<svg class="chart" id="{html.escape(chart_id)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{html.escape(title)}">']
    for t in yt:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_text(t, yt)}</text>')
    for t in xt:
        parts.append(f'<text class="tick" x="{px(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{tick_text(t, xt)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{TOP + ph}" y2="{TOP + ph}"/>'
                 f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + ph}"/>'
                 f'<text class="tick" x="{LEFT + pw / 2:.1f}" y="{H - 4}" text-anchor="middle">step</text>')
    if unit:
        parts.append(f'<text class="tick" x="12" y="{TOP + ph / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {TOP + ph / 2:.1f})">{html.escape(unit)}</text>')
    for i, s in enumerate(drawn):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.8" points="{pts}"/>')
        for x, y in s.points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.4" fill="{color}"><title>'
                         f'{html.escape(s.name)} at step {_fmt(x)}: {y:.6g}</title></circle>')
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{html.escape(s.name)}'
                     f"</span>" for i, s in enumerate(drawn))
    return (f'<figure class="plot"><figcaption>{html.escape(title)}</figcaption>{"".join(parts)}'
            f'<div class="legend">{legend}</div></figure>')


def _series(steps: list[dict[str, Any]], key: str, name: str | None = None,
            per: str | None = None, counter: bool = False) -> Series:
    """The values of `key` over the steps (divided by the step's `per` key, when given). A `counter`
    (`tool_errors/<kind>`, written only at steps where the kind occurred) is 0 at the other steps."""
    pts = []
    for r in steps:
        v, d = r.get(key, 0.0 if counter else None), (r.get(per) if per else 1.0)
        if isinstance(v, (int, float)) and isinstance(d, (int, float)) and d and math.isfinite(v):
            pts.append((float(r["step"]), float(v) / float(d)))
    return Series(name or key, tuple(pts))


def _keys(steps: list[dict[str, Any]], prefix: str, skip: Sequence[str] = ()) -> list[str]:
    found = dict.fromkeys(k for r in steps for k in r if k.startswith(prefix) and k not in skip)
    return sorted(found)


def _nonzero(series: list[Series]) -> list[Series]:
    return [s for s in series if any(y for _, y in s.points)]


Chart = tuple[str, str, str, Callable[[list[dict[str, Any]]], list[Series]]]

# (id, title, unit, series of the run's steps)
CHARTS: tuple[Chart, ...] = (
    ("reward", "Reward and success (mean / share per episode)", "", lambda st: [
        _series(st, "reward_mean"), _series(st, "success_rate")]),
    ("loss", "Policy loss and gradient norm", "", lambda st: [_series(st, "loss"), _series(st, "grad_norm")]),
    ("kl", "KL (approx_kl to the sampling policy, kl_ref to the reference)", "nats/token", lambda st: [
        _series(st, "approx_kl"), _series(st, "kl_ref")]),
    ("entropy", "Entropy of the policy on trained tokens", "nats/token", lambda st: [_series(st, "entropy")]),
    ("length", "Response length and turns (mean per episode)", "", lambda st: [
        _series(st, "response_tokens_mean", "model tokens"), _series(st, "turns_mean", "turns"),
        _series(st, "tool_calls_mean", "tool calls")]),
    ("tool-errors", "Tool errors per episode, by kind", "per episode", lambda st: _nonzero([
        _series(st, k, k.removeprefix("tool_errors/"), per="episodes", counter=True) for k in _keys(st, "tool_errors/")])),
    ("failures", "Failed episodes by class (totals per step)", "episodes", lambda st: _nonzero([
        _series(st, k, k.removeprefix("failures/"), counter=True) for k in _keys(st, "failures/")])),
    ("signal", "Task groups with all rewards equal (no learning signal)", "groups", lambda st: [
        _series(st, "uniform_reward_groups", "uniform"), _series(st, "reward_groups", "all groups")]),
    ("throughput", "Tokens per second", "tokens/s", lambda st: [
        _series(st, k, k.removeprefix("tokens_per_s/")) for k in _keys(st, "tokens_per_s/")]),
    ("time", "Time split per step", "seconds", lambda st: [
        _series(st, k, k.removeprefix("time/")) for k in ["time/step", *_keys(st, "time/", skip=("time/step",))]]),
)


def charts(steps: list[dict[str, Any]]) -> list[str]:
    """The SVG figures of every chart the run has data for, in `CHARTS` order."""
    out = []
    for chart_id, title, unit, make in CHARTS:
        series = [s for s in make(steps) if s.points]
        if series:
            out.append(line_chart(f"chart-{chart_id}", title, series, unit))
    return out
