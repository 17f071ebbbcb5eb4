"""The trajectory viewer: every saved episode rendered as HTML, one shown at a time.

Each episode (an episode view of `agentrl.driver.trajectory_log`) becomes a `<section
class="episode">`: its facts, then turn by turn the rendered prompt, each model turn token by token
(trained tokens, loss mask 1, are marked and tinted by their sampling probability; the logprob is
in each token's tooltip), the tool calls the env's parser read, the observation with its typed tool
errors, and the turn's reward. Everything the model or a tool wrote is escaped here, so no text of
an episode can become markup or script.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def episode_label(i: int, ep: dict[str, Any]) -> str:
    adv = ep.get("advantage")
    adv_text = f" · adv {adv:+.2f}" if isinstance(adv, (int, float)) else ""
    fail = f" · FAILED {ep['failure']}" if ep.get("failure") else ""
    return (f"#{i + 1} · step {ep.get('step', '?')} · {ep.get('task_id', '?')} · reward {ep.get('reward', 0):g}"
            f"{adv_text}{fail}")


def _label_or_index(i: int, ep: dict[str, Any]) -> str:
    try:
        return episode_label(i, ep)
    except (TypeError, ValueError):
        return f"#{i + 1}"


def _token(tok: list[Any]) -> str:
    text, logprob, mask = (tok + [None, None, 0])[:3]
    shown = _e(text).replace("\n", "↵\n") or "∅"
    if not mask:
        return f'<span class="tok untrained" title="not trained (loss mask 0)">{shown}</span>'
    if isinstance(logprob, (int, float)):
        p = math.exp(logprob)
        # Low-probability tokens stand out: hue from red (p = 0) to green (p = 1).
        return (f'<span class="tok trained" style="background:hsl({120 * p:.0f},70%,86%)" '
                f'title="trained · logprob {logprob:.4f} · p {p:.3f}">{shown}</span>')
    return f'<span class="tok trained" title="trained · logprob unknown">{shown}</span>'


def _model_turn(seg: dict[str, Any]) -> str:
    tokens = "".join(_token(list(t)) for t in seg.get("tokens", []))
    reward = seg.get("reward")
    badge = f'<span class="badge reward">turn reward {reward:g}</span>' if isinstance(reward, (int, float)) else (
        '<span class="badge muted">no reward (the turn did not reach the env)</span>')
    calls = "".join(f'<li class="call"><b>{_e(c.get("name"))}</b>(<code>{_e(json.dumps(c.get("arguments")))}</code>)'
                    "</li>" for c in seg.get("calls", []))
    issues = "".join(f'<li class="issue">unreadable call: {_e(m)}</li>' for m in seg.get("issues", []))
    listed = f'<ul class="calls">{calls}{issues}</ul>' if calls or issues else ""
    return (f'<div class="turn model"><div class="who">model · turn {_e(seg.get("turn"))} {badge}</div>'
            f'<pre class="tokens">{tokens}</pre>{listed}</div>')


def _observation(seg: dict[str, Any]) -> str:
    errors = "".join(f'<span class="badge error">tool error: {_e(k)}</span>' for k in seg.get("errors", []))
    return (f'<div class="turn observation"><div class="who">tool results / env {errors}</div>'
            f'<pre>{_e(seg.get("text", ""))}</pre></div>')


def _facts(ep: dict[str, Any]) -> str:
    rows = [("env", ep.get("env_id")), ("task", ep.get("task_id")), ("group", ep.get("group_id")),
            ("reward", ep.get("reward")), ("success", ep.get("success")), ("advantage", ep.get("advantage")),
            ("trained on", ep.get("trained")), ("turns", ep.get("turns")), ("tool calls", ep.get("tool_calls")),
            ("tool errors", ep.get("tool_errors") or "none"), ("ended by", ep.get("truncation") or "the env"),
            ("turn rewards", ep.get("turn_rewards"))]
    if ep.get("failure"):
        rows.append(("failure", f"{ep['failure']}: {ep.get('error')}"))
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
                    for k, v in rows)
    return f'<table class="facts">{cells}</table>'


def render_episode(i: int, ep: dict[str, Any]) -> str:
    """One episode's section (hidden until picked)."""
    body = []
    for seg in ep.get("segments", []):
        kind = seg.get("kind")
        if kind == "prompt":
            body.append(f'<div class="turn prompt"><div class="who">rendered prompt (chat template)</div>'
                        f'<pre>{_e(seg.get("text", ""))}</pre></div>')
        elif kind == "model":
            body.append(_model_turn(seg))
        elif kind == "observation":
            body.append(_observation(seg))
    return (f'<section class="episode" data-index="{i}" hidden><h3>{_e(episode_label(i, ep))}</h3>{_facts(ep)}'
            f'{"".join(body)}</section>')


def viewer(episodes: list[dict[str, Any]], saved: int) -> str:
    """The viewer: a picker and every episode's section; a note when the run saved none."""
    if not episodes:
        return ('<p class="note">This run saved no trajectories (metrics.save_trajectories was 0, or the run '
                'predates it).</p>')
    options = "".join(f'<option value="{i}">{_e(_label_or_index(i, ep))}</option>' for i, ep in enumerate(episodes))
    capped = (f" ({len(episodes)} of the {saved} saved, spread over the run)" if saved > len(episodes) else "")
    key = ('<p class="note">Model tokens: <span class="tok trained" style="background:hsl(120,70%,86%)">trained'
           '</span> (loss mask 1), tinted from red (improbable) to green (probable) by the sampling probability; '
           'hover a token for its logprob. <span class="tok untrained">greyed</span> tokens were not trained.</p>')
    return (f'<label for="episode-select">Episode{capped}: </label><select id="episode-select">{options}</select>'
            f'{key}<div id="episodes">{"".join(_guarded(i, ep) for i, ep in enumerate(episodes))}</div>')


def _guarded(i: int, ep: dict[str, Any]) -> str:
    """An episode's section, or one saying why it cannot be shown (a hand-edited or foreign line)."""
    try:
        return render_episode(i, ep)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return (f'<section class="episode" data-index="{i}" hidden><p class="problems">this saved episode could '
                f'not be shown ({_e(type(exc).__name__)}: {_e(exc)})</p></section>')
