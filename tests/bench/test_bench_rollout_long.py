"""bench/rollout_long.py: its prefill FLOP count by hand, and a scaled-down CPU run against HF generate."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_rollout_long", ROOT / "bench" / "rollout_long.py")
        mod = sys.modules["bench_rollout_long"] = importlib.util.module_from_spec(spec)  # for its dataclass
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_prefill_flops_by_hand():
    # 2 layers, hidden 8, 2 query heads of dim 4, 1 KV head, MLP width 16, vocab 10, a 5-token prompt.
    cfg = types.SimpleNamespace(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=4, intermediate_size=16, vocab_size=10)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8 = 192; gate, up, down 3 * 8 * 16 = 384 -> 576 parameters
    linear = 2 * 2 * 576 * 5
    attention = 2 * (2 * 2 * 4 * 5 * 5)  # layers x (QK^T + PV over half of 5x5, 2 FLOPs a MAC) per head
    head = 2 * 8 * 10
    assert _module().prefill_flops(cfg, 5) == linear + attention + head


def test_cpu_small_run_reports_prefill_against_the_ceiling(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rollout_long.py"), "--cpu-small", "--shapes", "L1,L2", "--repeats", "1",
         "--threads", "1", "--json", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["workload"], r["backend"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(w, b) for w in ("L1", "L1 prefill", "L2") for b in ("hf_generate", "embedded")}
    assert rows["L1", "embedded"]["tokens"] == rows["L1", "hf_generate"]["tokens"] == 8 * 32
    assert rows["L2", "embedded"]["tokens"] == 4 * 4 * 32
    for b in ("hf_generate", "embedded"):
        prefill = rows["L1 prefill", b]
        assert prefill["tokens"] == 8 * 512 and 0 < prefill["of_matmul_ceiling"]
        assert prefill["model_tflops"] > 0 and prefill["matmul_tflops"] > 0
