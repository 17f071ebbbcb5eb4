"""bench/rollout.py with a backend timed in a child process (`--backend-site`), at tiny size on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_backend_site_runs_the_column_in_a_child_with_that_path(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rollout.py"), "--cpu-small", "--workloads", "plain,grpo",
         "--prompts", "2", "--prompt-len", "8", "--new", "8", "--groups", "1", "--n", "2", "--repeats", "1",
         "--threads", "1", "--backends", "emb2=embedded", "--backend-site", f"emb2={site}", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    by = {(r["workload"], r["backend"]): r for r in rows}
    for w in ("a:2x8x8", "b:1x2"):
        child, parent = by[w, "emb2"], by[w, "embedded"]
        # Same prompts, same sizes: the child generated exactly what the parent's engine did.
        assert child["tokens"] == parent["tokens"] > 0
        assert child["vs_hf"] > 0 and child["vs_embedded"] > 0
    assert by["b:1x2", "emb2"]["prompt_cache_hit_rate"] == by["b:1x2", "embedded"]["prompt_cache_hit_rate"] == 0.5
    assert f"PYTHONPATH={ROOT}{os.pathsep}{site}" in done.stdout
    assert "| workload | hf_generate | embedded | emb2 |" in done.stdout


def test_a_malformed_backend_site_stops_with_what_to_write():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout.py"), "--cpu-small", "--backend-site", "sglang"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "expected LABEL=PATH" in done.stderr
