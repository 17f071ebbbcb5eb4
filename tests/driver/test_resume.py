"""`agentrl train --resume` repeats the uninterrupted run bit for bit (CPU) after a SIGKILL, after the
run directory was moved, and from the previous checkpoint when the latest one is corrupt or truncated;
repeated non-finite updates stop a run with a message naming the last good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentrl.trainer.checkpoint import checkpoint_step, latest_checkpoint

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


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _policy(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step-{step:06d}" / "state.pt", weights_only=False)["policy"]


@pytest.fixture(scope="module")
def reference(stopping_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps that keeps every checkpoint (to compare weights at any step)."""
    tmp = tmp_path_factory.mktemp("reference")
    full = tmp / "full"
    _run(_cmd(_config(tmp, stopping_model_dir), full, f"train.keep_checkpoints={STEPS}"))
    records = _step_records(full)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in records.values()}) > 3  # real, varying losses, not all zero
    return full


def _assert_continues_reference(run_dir: Path, reference: Path, first: int, last: int) -> None:
    """Steps first..last after the last resume of `run_dir` equal the reference run's, and so do the weights."""
    after, want = _step_records(run_dir, after_resume=True), _step_records(reference)
    assert min(after) == first
    for step in range(first, last + 1):
        for key in ("loss", "grad_norm", "reward_mean", "entropy"):
            assert after[step][key] == want[step][key], (step, key, after[step][key], want[step][key])
    a, b = _policy(reference, last), _policy(run_dir, last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_matches_uninterrupted_run(stopping_model_dir, tmp_path, reference):
    cfg = _config(tmp_path, stopping_model_dir)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cfg, cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step-000002"):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A kill between renaming a checkpoint into place and moving the pointer leaves a newer complete one.
    killed_at = checkpoint_step(latest_checkpoint(cut))
    assert 2 <= killed_at <= STEPS - 5, killed_at

    _run(_cmd(cfg, cut, "--resume"))
    _assert_continues_reference(cut, reference, killed_at + 1, STEPS)


def test_moved_run_directory_resumes(stopping_model_dir, tmp_path, reference):
    cfg = _config(tmp_path, stopping_model_dir)
    first, moved = tmp_path / "a", tmp_path / "elsewhere" / "b"
    _run(_cmd(cfg, first, "train.steps=2"))
    moved.parent.mkdir()
    shutil.move(first, moved)
    _run(_cmd(cfg, moved, "train.steps=4", "--resume"))
    assert not first.exists()
    _assert_continues_reference(moved, reference, 3, 4)


def test_resume_falls_back_from_a_corrupt_or_truncated_latest_checkpoint(stopping_model_dir, tmp_path, reference):
    cfg = _config(tmp_path, stopping_model_dir)
    flipped, truncated = tmp_path / "flipped", tmp_path / "truncated"
    _run(_cmd(cfg, flipped, "train.steps=3"))  # keeps step-000002 and step-000003
    shutil.copytree(flipped, truncated)
    state_pt = flipped / "checkpoints" / "step-000003" / "state.pt"
    raw = bytearray(state_pt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state_pt.write_bytes(bytes(raw))
    state_pt = truncated / "checkpoints" / "step-000003" / "state.pt"
    state_pt.write_bytes(state_pt.read_bytes()[:-100])
    for run_dir, why in ((flipped, "state.pt is corrupt: sha256"), (truncated, "state.pt has")):
        done = _run(_cmd(cfg, run_dir, "train.steps=5", "--resume"))
        out = " ".join((done.stdout + done.stderr).split())
        assert "checkpoint step-000003 skipped and renamed to rejected-step-000003" in out and why in out, out[-3000:]
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        skipped = [e for e in events if e.get("event") == "checkpoint_skipped"]
        assert [(e["checkpoint"], e["set_aside_as"]) for e in skipped] == [("step-000003", "rejected-step-000003")]
        assert why in skipped[0]["reason"]
        resume = [e for e in events if e.get("event") == "resume"]
        assert [(e["from_step"], e["checkpoint"], e["verified"]) for e in resume] == [(2, "step-000002", True)]
        _assert_continues_reference(run_dir, reference, 3, 5)


def test_checkpoint_from_before_manifests_resumes_with_a_warning(stopping_model_dir, tmp_path, reference):
    cfg = _config(tmp_path, stopping_model_dir)
    run_dir = tmp_path / "old"
    old = run_dir / "checkpoints" / "step-000002"
    shutil.copytree(reference / "checkpoints" / "step-000002", old)
    # What the previous version wrote: no manifest, no format, and run_dir inside the recorded config.
    (old / "manifest.json").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["format"]
    meta["config"]["run_dir"] = "/where/it/used/to/be"
    # Fields added to the config since then: absent from the record, they resume at their defaults.
    for key in ("model.chat_template_kwargs", "env.allow_train_on_eval_split", "failures.max_retries",
                "failures.policy.env_error"):
        meta["config"].pop(key, None)
    (old / "meta.json").write_text(json.dumps(meta))
    done = _run(_cmd(cfg, run_dir, "train.steps=3", "--resume"))
    out = " ".join((done.stdout + done.stderr).split())
    assert "checkpoint step-000002 has no manifest" in out and "without verifying its bytes" in out, out[-3000:]
    resume = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][0]
    assert resume == {"event": "resume", "from_step": 2, "checkpoint": "step-000002", "verified": False}
    _assert_continues_reference(run_dir, reference, 3, 3)


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


def test_ppo_with_a_critic_resumes_bit_exactly(stopping_model_dir, tmp_path):
    """algorithm.advantage=gae: the critic's weights, optimizer and schedule are checkpointed with the
    policy's, so 2 steps + --resume to 4 equals 4 uninterrupted steps bit for bit, critic included."""
    cfg = _config(tmp_path, stopping_model_dir)
    ppo = ["algorithm.advantage=gae", "critic.lr=0.003", "critic.warmup_steps=2", "train.steps=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_cmd(cfg, full, *ppo, "train.keep_checkpoints=4"))
    _run(_cmd(cfg, cut, *ppo[:-1], "train.steps=2"))
    _run(_cmd(cfg, cut, *ppo, "--resume"))
    after, want = _step_records(cut, after_resume=True), _step_records(full)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "reward_mean", "critic/loss", "critic/grad_norm", "critic/value_mean"):
            assert after[step][key] == want[step][key], (step, key, after[step][key], want[step][key])
    assert want[4]["critic/grad_norm"] > 0 and want[4]["critic/value_mean"] != 0  # the critic really trains
    a, b = (torch.load(d / "checkpoints" / "step-000004" / "state.pt", weights_only=False) for d in (full, cut))
    for part in ("policy", "critic"):
        model_a, model_b = (a[part], b[part]) if part == "policy" else (a[part]["model"], b[part]["model"])
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), part
    assert a["critic"]["scheduler"] == b["critic"]["scheduler"]
    first = torch.load(full / "checkpoints" / "step-000001" / "state.pt", weights_only=False)["critic"]["model"]
    assert any(not torch.equal(first[k], a["critic"]["model"][k]) for k in first)
    assert (full / "final" / "critic" / "value_head.safetensors").is_file()
