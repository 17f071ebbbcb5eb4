"""bench/e2e.py on CPU: both turn schedules play the very same episodes (the premise of its ratio)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "e2e.py"
_spec = importlib.util.spec_from_file_location("bench_e2e", _PATH)
bench = sys.modules["bench_e2e"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_both_schedules_play_the_same_tokens(tiny_model_dir, tmp_path):
    rows = bench.main(["--random", "tiny", "--tokenizer", tiny_model_dir, "--device", "cpu", "--episodes", "6",
                       "--turns", "3", "--max-latency-ms", "20", "--repeats", "1", "--json", str(tmp_path / "e2e.json")])
    sync, overlapped = rows
    assert sync["mode"] == "turn-synchronous" and overlapped["mode"] == "per-episode async"
    # Seeded requests sample the same tokens whatever the batch, so the two schedules do equal work.
    assert sync["tokens"] == overlapped["tokens"] > 6 * 3
    assert (tmp_path / "e2e.json").is_file() and sync["speedup"] == 1.0 and overlapped["speedup"] > 0
