"""The report page: one HTML file with its CSS, script and SVG inline, so it opens anywhere, offline.

Nothing on the page names a URL: no fonts, images, scripts or styles are fetched, and a
Content-Security-Policy meta tag forbids the page to connect anywhere, so even text an episode
holds cannot make the browser load something.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

from agentrl.eval.markdown import interval, label, metric_order, number
from agentrl.eval.report.plots import charts
from agentrl.eval.report.run_files import RunFiles
from agentrl.eval.report.viewer import viewer

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header,main{max-width:1180px;margin:0 auto;padding:0 20px}header{padding-top:18px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 6px}.sub{color:#555}.note{color:#555;font-size:13px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}th,td{border:1px solid #ddd;padding:3px 8px}
th{background:#f0f0f3;text-align:left;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plot{margin:0;background:#fff;border:1px solid #ddd;padding:8px}
.plot figcaption{font-weight:600;margin-bottom:4px}.chart .grid{stroke:#eee}.chart .axis{stroke:#888}
.chart .tick{font-size:10px;fill:#555}.legend{font-size:12px;max-width:520px}
.key{margin-right:10px;white-space:nowrap}.key i{display:inline-block;width:10px;height:10px;margin-right:4px}
.problems{background:#fff4e5;border:1px solid #f0b35a;padding:6px 12px}
.episode{background:#fff;border:1px solid #ddd;padding:8px 12px;margin-top:10px}
.turn{margin:8px 0;border-left:4px solid #ccc;padding:2px 10px}.turn.prompt{border-color:#999}
.turn.model{border-color:#1f77b4}.turn.observation{border-color:#2ca02c}.who{font-weight:600;font-size:12px}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace}
.tok{border-radius:2px;padding:0 1px}.tok.trained{border-bottom:2px solid #1f77b4}.tok.untrained{color:#999}
.badge{font-weight:400;font-size:11px;border-radius:8px;padding:1px 7px;margin-left:6px;background:#e8f0fe}
.badge.error{background:#fde2e1;color:#a00}.badge.muted{background:#eee;color:#666}.calls{margin:2px 0 4px}
.call code{font-size:12px}.issue{color:#a00}select{max-width:100%;font-size:13px}details{margin:6px 0}
.yes{color:#070;font-weight:600}
"""

SCRIPT = """
(function(){
  var pick = document.getElementById('episode-select');
  if (!pick) return;
  function show(i){
    var all = document.querySelectorAll('section.episode');
    for (var k = 0; k < all.length; k++) all[k].hidden = all[k].getAttribute('data-index') !== String(i);
  }
  pick.addEventListener('change', function(){ show(pick.value); });
  show(pick.value);
})();
"""

# Rows of the before/after table: the evaluations run by `agentrl train` (one episode per task).
_TRAIN_EVAL_KEYS = ("success_rate", "reward_mean", "tool_calls_mean", "turns_mean", "response_tokens_mean",
                    "tool_errors", "episode_errors", "scored_tasks", "episodes")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _before_after(summary: dict[str, Any] | None) -> str:
    if not summary or not any(k in summary for k in ("before", "after")):
        return '<p class="note">No evaluation before or after training was recorded (summary.json).</p>'
    meaning = summary.get("meaning", {})
    cols = [k for k in ("before", "after") if isinstance(summary.get(k), dict)]
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = []
    for key in _TRAIN_EVAL_KEYS:
        if any(key in summary[c] for c in cols):
            cells = "".join(f'<td class="num">{number(summary[c].get(key))}</td>' for c in cols)
            rows.append(f"<tr><th>{_e(key)}</th>{cells}<td>{_e(meaning.get(key, ''))}</td></tr>")
    return (f'<table id="eval-before-after"><tr><th>held-out ({_e("one episode per task")})</th>{head}'
            f'<th>what it is</th></tr>{"".join(rows)}</table>')


def _eval_doc(name: str, doc: dict[str, Any]) -> str:
    s = doc["settings"]
    out = [f"<h3>{_e(name)}: split {_e(s.get('split'))}, {_e(s.get('num_tasks'))} tasks, k={_e(s.get('k'))}, "
           f"temperature {_e(s.get('temperature'))}</h3>"]
    for model in doc["models"]:
        for env_id, summary in (model.get("envs") or {}).items():
            rows = "".join(f'<tr><th>{_e(label(m))}</th><td class="num">{number(v["value"])}</td>'
                           f'<td class="num">{interval(v["ci"])}</td><td class="num">{v["tasks"]}</td></tr>'
                           for m in metric_order(list(summary["means"])) for v in [summary["means"][m]])
            out.append(f'<table class="eval-table"><tr><th>{_e(model["name"])} on {_e(env_id)}</th><th>value</th>'
                       f"<th>95% CI over tasks</th><th>tasks</th></tr>{rows}</table>")
    for env_id, diffs in (doc.get("compare") or {}).items():
        rows = "".join(f'<tr><th>{_e(label(m))}</th><td class="num">{number(d["a"])}</td><td class="num">'
                       f'{number(d["b"])}</td><td class="num">{d["diff"]:+.3f}</td><td class="num">{interval(d["ci"])}'
                       f'</td><td class="{"yes" if d["significant"] else ""}">{"yes" if d["significant"] else "no"}'
                       "</td></tr>" for m in metric_order(list(diffs)) for d in [diffs[m]])
        out.append(f'<table class="eval-table"><tr><th>A - B on {_e(env_id)}</th><th>A</th><th>B</th><th>A - B</th>'
                   f"<th>95% paired CI</th><th>significant</th></tr>{rows}</table>")
    return "".join(out)


def _guarded(render, name: str, doc: dict[str, Any]) -> str:
    """`render(name, doc)`, or a note naming the file when it is not shaped as `agentrl eval` writes it."""
    try:
        return render(name, doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f'<p class="problems">eval/{_e(name)} could not be shown ({_e(type(exc).__name__)}: {_e(exc)})</p>'


def _problems(run: RunFiles) -> str:
    items = [_e(p) for p in run.problems]
    items += [f"run stopped with an error: {_e(ev.get('message'))}" for ev in run.events if ev.get("event") == "error"]
    items += [f"checkpoint {_e(ev.get('checkpoint'))} skipped: {_e(ev.get('reason'))}" for ev in run.events
              if ev.get("event") == "checkpoint_skipped"]
    return f'<div class="problems"><ul>{"".join(f"<li>{i}</li>" for i in items)}</ul></div>' if items else ""


def render_page(run: RunFiles) -> str:
    """The whole report of `run` as one HTML document."""
    cfg = run.config or {}
    model, env = (cfg.get("model") or {}).get("path", "?"), (cfg.get("env") or {}).get("id", "?")
    figures = charts(run.steps)
    curves = (f'<div class="plots">{"".join(figures)}</div>' if figures else
              '<p class="note">No training steps recorded in metrics.jsonl.</p>')
    evals = "".join(_guarded(_eval_doc, name, doc) for name, doc in run.evals) or (
        '<p class="note">No `agentrl eval` results in this run (run <code>agentrl eval RUN_DIR --k 4</code> to add '
        "them; they go to RUN_DIR/eval/).</p>")
    config = json.dumps(cfg, indent=2)
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agentrl report: {_e(run.path.name)}</title><style>{STYLE}</style></head>
<body><header><h1>agentrl report: {_e(run.path.name)}</h1>
<div class="sub">env <b>{_e(env)}</b> · model <code>{_e(model)}</code> · {len(run.steps)} step(s) recorded ·
made {made} by <code>agentrl report</code> (this file is self-contained: it loads nothing from anywhere)</div>
</header><main>{_problems(run)}
<h2 id="evaluation">Evaluation</h2>{_before_after(run.summary)}{evals}
<h2 id="curves">Training curves</h2>{curves}
<h2 id="trajectories">Trajectories</h2>{viewer(run.episodes, run.episodes_saved)}
<h2 id="config">Config</h2><details><summary>config.json</summary><pre>{_e(config)}</pre></details>
</main><script>{SCRIPT}</script></body></html>
"""
