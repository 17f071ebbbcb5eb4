"""`agentrl train --resume` after a SIGKILL repeats the uninterrupted run bit for bit (CPU), and
repeated non-finite updates stop a run with a message naming the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("run_train.py")
STEPS = 12


def _config(tmp_path: Path, model_dir: str, env_id: str = "digits-v0") -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{path: {model_dir}}}
env: {{id: {env_id}}}
rollout: {{prompts_per_step: 3, samples_per_prompt: 3, max_tokens_per_turn: 16, max_turns: 1, max_total_tokens: 64}}
optim: {{lr: 0.003, warmup_steps: 3}}
train: {{steps: {STEPS}, checkpoint_every: 1, keep_checkpoints: 2, micro_batch_tokens: 128}}
eval: {{num_tasks: 0}}
""")
    return cfg


def _cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "train", str(cfg), f"run_dir={run_dir}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _step_records(run_dir: Path, after_resume: bool = False) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if after_resume:
        start = max(i for i, r in enumerate(lines) if r.get("event") == "resume")
        lines = lines[start + 1:]
    return {r["step"]: r for r in lines if "step" in r}


def test_resume_after_kill_matches_uninterrupted_run(stopping_model_dir, tmp_path):
    cfg = _config(tmp_path, stopping_model_dir)
    full = tmp_path / "full"
    done = subprocess.run(_cmd(cfg, full), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = _step_records(full)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in reference.values()}) > 3  # real, varying losses, not all zero

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cfg, cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step-000002"):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 2 <= killed_at <= STEPS - 5, killed_at

    resumed = subprocess.run(_cmd(cfg, cut, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _step_records(cut, after_resume=True)
    assert min(after) == killed_at + 1
    for step in range(killed_at + 1, killed_at + 6):
        for key in ("loss", "grad_norm", "reward", "entropy"):
            assert after[step][key] == reference[step][key], (step, key, after[step][key], reference[step][key])
    a = torch.load(full / "checkpoints" / f"step-{STEPS:06d}" / "state.pt", weights_only=False)["policy"]
    b = torch.load(cut / "checkpoints" / f"step-{STEPS:06d}" / "state.pt", weights_only=False)["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(stopping_model_dir, tmp_path):
    cfg = _config(tmp_path, stopping_model_dir)
    run = tmp_path / "run"
    first = subprocess.run(_cmd(cfg, run, "train.steps=1"), env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(_cmd(cfg, run, "train.steps=2", "optim.lr=0.01", "--resume"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2
    assert "optim.lr" in again.stdout and "cannot resume" in again.stdout
    empty = subprocess.run(_cmd(cfg, tmp_path / "nothing", "--resume"), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert empty.returncode == 2 and "nothing to resume" in empty.stdout


def test_repeated_non_finite_updates_stop_the_run(stopping_model_dir, tmp_path):
    # Rewards of 1e38 (a reward-scale bug) with dr_grpo (no std normalisation) overflow the float32 loss.
    cfg = _config(tmp_path, stopping_model_dir, env_id="huge-digits-v0")
    run = tmp_path / "run"
    proc = subprocess.run(_cmd(cfg, run, "algorithm.advantage=dr_grpo", "train.max_nonfinite_steps=3"), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "3 steps in a row had a non-finite loss" in out, out[-2000:]
    records = _step_records(run)
    assert [r["nonfinite"] for r in records.values()][-3:] == [1.0, 1.0, 1.0]
    assert all(r["skipped"] == 1.0 for r in list(records.values())[-3:])
    # Skipped steps leave the weights alone: every checkpoint holds the starting weights.
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(stopping_model_dir).state_dict()
    last = (run / "checkpoints" / "latest").read_text().strip()
    assert last in out  # the message names it
    saved = torch.load(run / "checkpoints" / last / "state.pt", weights_only=False)["policy"]
    assert all(torch.equal(start[k], saved[k]) for k in start)
