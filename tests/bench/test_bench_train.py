"""bench/train.py at tiny size on CPU: every variant runs, agrees on the loss, and reports its numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path


_PATH = Path(__file__).resolve().parents[2] / "bench" / "train.py"
_spec = importlib.util.spec_from_file_location("bench_train", _PATH)
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)


def test_tiny_run_reports_every_variant(tmp_path):
    out = tmp_path / "train.json"
    eager = [v for v in bench.VARIANTS if not v.startswith("packed_compiled")]  # compiling is for the GPU run
    result = bench.main(["--tiny", "--device", "cpu", "--tokens", "600", "--micro-batch-tokens", "256",
                         "--max-len", "128", "--warmup", "0", "--steps", "1", "--lp-tokens", "256", "--json", str(out),
                         "--variants", ",".join(eager)])
    assert json.loads(out.read_text())["variants"].keys() == set(eager)
    losses = [r["loss_first"] for r in result["variants"].values()]
    # Same weights, same batch, fp32: padded and packed compute the same loss.
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) - min(losses) < 1e-4
    for r in result["variants"].values():
        assert r["tokens_per_s"] > 0 and r["real_tokens"] == result["batch"]["real_tokens"]
        assert r["peak_mem_gib"] is None  # CPU: not measured
    assert result["variants"]["packed"]["padding_fraction"] == 0.0
    assert result["variants"]["padded"]["computed_tokens"] >= result["variants"]["padded"]["real_tokens"]
    assert "packed/padded" in result["ratios"] and result["matmul_tflops"] > 0
    assert {r["chunk"] for r in result["logprob_memory"]["ckpt"]["runs"]} >= {128}


def test_padded_micro_batches_count_padding():
    # budget 10: [4, 2] pads to 2 * 4 = 8; adding 3 would make 3 * 4 = 12 > 10; [3, 3, 3] = 9.
    assert bench.padded_micro_batches([4, 2, 3, 3, 3], 10, sort=False) == [[0, 1], [2, 3, 4]]
    # sorted by length first: [4, 3] = 8, [3, 3, 2] = 9.
    assert bench.padded_micro_batches([4, 2, 3, 3, 3], 10, sort=True) == [[0, 2], [3, 4, 1]]


def test_model_flops_by_hand():
    cfg = bench.model_config(tiny=True)  # E 64, F 128, V 512, 2 layers, 4 heads of 16, 2 kv heads
    # per layer: q, o 64*64 each; k, v 64*32 each; MLP 3 * 64*128 -> 8192 + 4096 + 24576 = 36864
    # dense = 2 * 36864 + 512 * 64 = 106496; 6 * dense * 3 tokens = 1916928
    # attention, one sequence of 3: 6 * 2 * 64 * 3 * 4 = 9216
    assert bench.model_flops(cfg, [3]) == 1916928 + 9216
