"""FSDP2 on two CPU processes (gloo, under torchrun) computes the update one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp_parity.py")


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("agg_mode", ["token_mean", "seq_mean_token_mean"])
def test_two_rank_fsdp_matches_single_process(tiny_model_dir, tmp_path, agg_mode):
    common = [str(SCRIPT), "--model", tiny_model_dir, "--agg-mode", agg_mode]
    _run([sys.executable, *common, "--out", str(tmp_path / "ref.json")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          *common, "--out", str(tmp_path / "fsdp.json")], tmp_path)
    ref = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert got["trained_tokens"] == ref["trained_tokens"]
    for key in ("loss", "grad_norm", "entropy", "clip_frac"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    ref_w = torch.load(tmp_path / "ref.json.pt")
    got_w = torch.load(tmp_path / "fsdp.json.pt")
    assert sorted(ref_w) == sorted(got_w)
    # SGD with lr 0.5: the parameters moved by lr x gradient; equal parameters mean equal gradients.
    moved = max(float((ref_w[k] - got_w[k]).abs().max()) for k in ref_w)
    assert moved < 1e-6
