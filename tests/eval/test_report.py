"""`agentrl report`: the page of a real short run renders in headless Chromium with its plots and its
trajectory viewer, loads nothing from anywhere, and escapes everything an episode holds.

The browser test needs the `playwright` Python package (a dev extra) and a Chromium binary (Debian's
`chromium` package, which .ci/run installs); where either is missing it skips and says which.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.errors import ConfigError
from agentrl.eval.report import write_report
from agentrl.eval.report.plots import charts, nice_ticks
from agentrl.eval.report.run_files import read_run

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def real_run(stopping_model_dir, tmp_path_factory) -> Path:
    """A short run of the quickstart's config (fewer, smaller steps), evaluated with k=2, and its report."""
    run = tmp_path_factory.mktemp("report") / "calculator"
    _cli("train", str(ROOT / "examples/calculator.yaml"), f"model.path={stopping_model_dir}", "train.steps=3",
         "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.num_tasks=8", f"run_dir={run}")
    _cli("eval", str(run), "--k", "2", "--tasks", "8")
    _cli("report", str(run))
    return run


def test_report_holds_curves_tables_and_episodes(real_run):
    page = (real_run / "report.html").read_text()
    assert page.count('<svg class="chart"') >= 8
    for chart in ("chart-reward", "chart-kl", "chart-entropy", "chart-length", "chart-throughput", "chart-time"):
        assert f'id="{chart}"' in page, chart
    assert 'id="eval-before-after"' in page and "pass@2 (unbiased)" in page and "calculator/final on calculator-v0" in page
    saved = sum(len(f.read_text().splitlines()) for f in (real_run / "trajectories").glob("step-*.jsonl"))
    assert saved == 3 * 4 and page.count('<section class="episode"') == saved  # metrics.save_trajectories=4
    assert 'class="tok trained"' in page and "logprob" in page and "rendered prompt" in page
    # Nothing on the page can fetch: no URL attributes at all, and a policy that forbids connections.
    assert "src=" not in page and "href=" not in page and "default-src 'none'" in page


def test_hostile_episode_text_stays_text(tmp_path):
    run = tmp_path / "run"
    (run / "trajectories").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\nnot json\n')
    evil = '</script><script>alert(1)</script><img src="http://attacker.example/x.png">'
    episode = {"step": 1, "task_id": evil, "reward": 0.0, "segments": [
        {"kind": "prompt", "text": evil},
        {"kind": "model", "turn": 1, "tokens": [[evil, -0.1, 1]], "calls": [{"name": evil, "arguments": {"x": evil}}],
         "reward": 0.0},
        {"kind": "observation", "text": "Error (parse): " + evil, "errors": ["parse"]}]}
    (run / "trajectories" / "step-000001.jsonl").write_text(json.dumps(episode) + "\n")
    page = write_report(run).read_text()
    assert "<img" not in page and "alert(1)</script>" not in page and page.count("<script>") == 1
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert "metrics.jsonl line 2 is not JSON" in page  # a broken line is named, not fatal
    # Lines of the right outline but the wrong insides are named too, and the rest still renders.
    (run / "trajectories" / "step-000002.jsonl").write_text(json.dumps({"reward": "high", "segments": [1]}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "odd.json").write_text(json.dumps({"models": [{"envs": 3}], "settings": {}}))
    page = write_report(run).read_text()
    assert "this saved episode could not be shown" in page and "eval/odd.json could not be shown" in page
    assert page.count('<section class="episode"') == 2


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_run(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a run directory"):
        read_run(tmp_path)


def test_charts_take_the_keys_a_run_has():
    steps = [{"step": s, "reward_mean": s / 10, "episodes": 4.0} for s in (1, 2, 3)]
    steps[1]["tool_errors/parse"] = 2.0  # a counter is written only at the steps where its kind occurred
    figures = charts(steps)
    assert len(figures) == 2  # reward and tool errors; charts of keys the run lacks are left out
    errors = next(f for f in figures if "Tool errors per episode" in f)
    assert all(f"parse at step {s}: {v}<" in errors for s, v in ((1, 0), (2, 0.5), (3, 0)))
    assert nice_ticks(0, 48) == [0, 20, 40, 60] and nice_ticks(1, 3, integer=True) == [1, 2, 3]


def _chromium() -> str | None:
    return os.environ.get("AGENTRL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(real_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "'agentrl[dev]'); the browser test needs it to drive Chromium")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (apt-get install chromium, which .ci/run does; or set AGENTRL_CHROMIUM)")
    url = (real_run / "report.html").resolve().as_uri()
    requested, blocked = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requested.append(r.url))
            page.route("**/*", lambda route: (route.continue_() if route.request.url == url else
                                              (blocked.append(route.request.url), route.abort())))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            charts_drawn = page.locator("svg.chart")
            assert charts_drawn.count() >= 8
            for i in range(charts_drawn.count()):
                box = charts_drawn.nth(i).bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 100
                assert charts_drawn.nth(i).locator("circle").count() >= 1
            visible = page.locator("section.episode:visible")
            assert visible.count() == 1 and visible.get_attribute("data-index") == "0"
            page.select_option("#episode-select", "2")
            visible = page.locator("section.episode:visible")
            assert visible.count() == 1 and visible.get_attribute("data-index") == "2"
            assert visible.locator(".turn.prompt").count() == 1 and visible.locator(".turn.model").count() >= 1
            token = visible.locator(".tok.trained").first
            assert token.is_visible() and "logprob" in token.get_attribute("title")
            assert page.locator("table.eval-table").count() >= 1 and page.locator("#eval-before-after").is_visible()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
            assert not errors, errors
        finally:
            browser.close()
    assert requested == [url] and not blocked, (requested, blocked)  # nothing left the page
