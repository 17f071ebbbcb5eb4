"""Atomic checkpoints: a SIGKILL in the middle of a save leaves the previous checkpoint usable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from agentrl.errors import TrainerError
from agentrl.trainer.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint

SAVER = """
import sys, torch
from agentrl.trainer.checkpoint import save_checkpoint
run_dir = sys.argv[1]
save_checkpoint(run_dir, 1, {"w": torch.arange(10.0), "step": 1})
print("saved 1", flush=True)
# Big enough that writing it takes a while: the parent kills us in the middle.
save_checkpoint(run_dir, 2, {"w": torch.ones(192 * 2**20 // 4), "step": 2})
print("saved 2", flush=True)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    root = checkpoint_root(tmp_path)
    deadline = time.monotonic() + 60
    while True:  # wait until the second save has started writing its state file, then kill
        partial = [p for p in root.glob(".tmp-step-000002-*/state.pt") if p.stat().st_size > 0]
        if partial:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "save finished before the kill"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "step-000002").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-000001"
    state, meta = load_checkpoint(latest)
    assert torch.equal(state["w"], torch.arange(10.0)) and meta["step"] == 1
    # The next save succeeds and clears the leftovers of the interrupted one.
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(3), "step": 2})
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not list(root.glob(".tmp-*"))


def test_latest_pointer_falls_back_and_old_checkpoints_are_pruned(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000003", "step-000004"]
    (root / "latest").write_text("step-000009\n")  # points nowhere: the newest complete one is used
    assert latest_checkpoint(tmp_path).name == "step-000004"
    (root / "step-000004" / "state.pt").unlink()  # incomplete: skipped
    assert latest_checkpoint(tmp_path).name == "step-000003"
    (root / "step-000003" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainerError, match="cannot read checkpoint"):
        load_checkpoint(root / "step-000003")
