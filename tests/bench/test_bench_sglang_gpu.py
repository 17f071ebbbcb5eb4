"""bench/sglang_gpu.py, the GPU proof of the sglang backend, run on CPU against the stand-in
(tests/rollout/sglang_protocol, not SGLang): the script's own logic (episodes through the agent loop
checked against the trainer's recompute, seeded requests beside greedy / sampled / top-p ones, the
weight update, the launched server's kill and restart)
works, so that the one run on the device measures SGLang, not a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_proof_script_passes_its_dry_run(tiny_model_dir, tmp_path):
    out = tmp_path / "proof.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "bench/sglang_gpu.py", "--cpu-dry-run", "--tiny", tiny_model_dir,
                           "--parts", "episodes,seeds,update,server", "--work", str(tmp_path / "work"),
                           "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["part"]: r for r in json.loads(out.read_text())}
    assert [results[p]["result"] for p in ("episodes", "seeds", "update", "server")] == ["PASS"] * 4
    assert results["seeds"]["greedy_neighbour_first_difference"] is None
    assert results["episodes"]["three_turn"] == 32 and results["episodes"]["max_abs_diff"] < 1e-4  # float32, CPU
    assert results["server"]["restarts"] == 1
