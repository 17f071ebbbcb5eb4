"""FSDP2 on two CPU processes (gloo, under torchrun) computes the update one process computes."""

from __future__ import annotations

import importlib.util
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


def test_two_rank_fsdp_critic_matches_single_process(tiny_model_dir, tmp_path):
    """The critic shards like the policy: its update on two gloo ranks equals one process's."""
    common = [str(SCRIPT), "--model", tiny_model_dir, "--critic"]
    _run([sys.executable, *common, "--out", str(tmp_path / "ref.json")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          *common, "--out", str(tmp_path / "fsdp.json")], tmp_path)
    ref = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert ref["critic/loss"] > 0 and ref["critic/vf_clip_frac"] > 0  # the clipped branch is exercised
    for key in ("critic/loss", "critic/grad_norm", "critic/vf_clip_frac", "critic/value_error"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    ref_w, got_w = torch.load(tmp_path / "ref.json.pt"), torch.load(tmp_path / "fsdp.json.pt")
    assert sorted(ref_w) == sorted(got_w) and "value_head.weight" in ref_w
    assert max(float((ref_w[k] - got_w[k]).abs().max()) for k in ref_w) < 1e-6  # SGD: equal gradients


def test_ray_trainer_workers_match_single_process(tiny_model_dir):
    """Two Ray actors, FSDP2 over gloo between them, give the single-process update."""
    import ray
    from transformers import AutoModelForCausalLM

    from agentrl.trainer.attention import register_varlen_attention
    from agentrl.trainer.update import LossSettings, policy_update
    from agentrl.trainer.workers import TrainerWorker

    spec = importlib.util.spec_from_file_location("agentrl_test_fsdp_parity", SCRIPT)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=register_varlen_attention())
    batch = parity.make_batch(model.config.vocab_size, groups=4, per_group=3, seed=1, max_len=48)
    settings = LossSettings(entropy_coef=0.01)
    ref = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, settings,
                        micro_batch_tokens=96, grad_clip=1e9, logprob_chunk=32)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        workers = TrainerWorker.group(tiny_model_dir, 2, optimizer="sgd", lr=0.5, micro_batch_tokens=96,
                                      grad_clip=1e9, logprob_chunk=32)
        metrics = ray.get([w.update.remote(batch.rows(parity.rank_rows(batch, r, 2)), settings)
                           for r, w in enumerate(workers)], timeout=300)
        states = ray.get([w.full_state_dict.remote() for w in workers], timeout=300)
        ray.get([w.close.remote() for w in workers], timeout=60)
    finally:
        ray.shutdown()
    for m in metrics:  # every rank reports the global numbers
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    mine = model.state_dict()
    assert max(float((states[0][k] - mine[k]).abs().max()) for k in mine) < 1e-6
