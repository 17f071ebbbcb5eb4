"""Checkpoints: atomic under SIGKILL, verified against their manifest on load (flipped bytes, truncation,
missing files), falling back to the newest intact one, and pruned without losing the last intact one."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from agentrl.errors import CheckpointError
from agentrl.trainer.checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_aside,
    verify_checkpoint,
)

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
    with pytest.raises(CheckpointError, match="state.pt has 16 bytes, the manifest says"):
        load_checkpoint(root / "step-000003")


def _training_state(step: int) -> dict:
    """What `save_run` saves, from a real model after `step` real AdamW steps."""
    torch.manual_seed(step)
    model = torch.nn.Linear(50, 20)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    for _ in range(step):
        model(torch.randn(4, 50)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    random.seed(step)
    return {"policy": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "guard": {"consecutive": 0, "total": 0}, "step": step}


def _member_offset(state_pt: Path, data: bytes) -> tuple[int, int]:
    """(offset, length) inside `state_pt` of the stored zip member whose bytes are `data`
    (torch.save stores storages uncompressed, so a member's bytes are the tensor's bytes)."""
    raw = state_pt.read_bytes()
    with zipfile.ZipFile(state_pt) as z:
        for info in z.infolist():
            if z.read(info) == data:
                h = info.header_offset  # local header: 30 bytes, then name and extra field of the lengths it gives
                name_len, extra_len = (int.from_bytes(raw[h + i:h + i + 2], "little") for i in (26, 28))
                start = h + 30 + name_len + extra_len
                assert raw[start:start + len(data)] == data
                return start, len(data)
    raise AssertionError(f"no member of {state_pt} holds those {len(data)} bytes")


def _flip_middle(path: Path, start: int = 0, length: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    length = len(raw) - start if length is None else length
    raw[start + length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


TENSORS = {  # a tensor of each kind state.pt holds, found by its bytes
    "policy weights": lambda s: s["policy"]["weight"],
    "optimizer moments": lambda s: s["optimizer"]["state"][0]["exp_avg_sq"],
    "torch RNG": lambda s: s["rng"]["torch"],
}


@pytest.mark.parametrize("kind", [*TENSORS, "pickled structure (python RNG, counters)", "meta.json", "manifest.json"])
def test_flipped_byte_is_detected_and_the_previous_checkpoint_is_used(tmp_path, kind):
    save_checkpoint(tmp_path, 1, _training_state(1), meta={"note": "first"}, keep_last=3)
    bad = save_checkpoint(tmp_path, 2, _training_state(2), meta={"note": "second"}, keep_last=3)
    state_pt = bad / "state.pt"
    if kind in TENSORS:
        tensor = TENSORS[kind](torch.load(state_pt, weights_only=True))
        _flip_middle(state_pt, *_member_offset(state_pt, _tensor_bytes(tensor)))
        # The failure this guards against: torch.load takes the flipped byte without complaint.
        silently = TENSORS[kind](torch.load(state_pt, weights_only=True))
        assert not torch.equal(silently, tensor)
    elif kind.startswith("pickled"):
        with zipfile.ZipFile(state_pt) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        _flip_middle(state_pt, *_member_offset(state_pt, pkl))
    else:
        _flip_middle(bad / kind)

    expected = {"meta.json": "meta.json is corrupt: sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64}",
                "manifest.json": "cannot read manifest.json"}.get(kind, "state.pt is corrupt: sha256")
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(bad)
    loaded = load_latest(tmp_path)
    assert loaded.step == 1 and loaded.verified and loaded.meta["note"] == "first"
    assert [s.path.name for s in loaded.skipped] == ["step-000002"]
    assert "step-000002" in loaded.skipped[0].reason and expected.split(" ")[0] in loaded.skipped[0].reason
    reference = _training_state(1)
    assert all(torch.equal(loaded.state["policy"][k], reference["policy"][k]) for k in reference["policy"])


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, 1, _training_state(1))
    bad = save_checkpoint(tmp_path, 2, _training_state(2))
    full = (bad / "state.pt").stat().st_size
    with open(bad / "state.pt", "r+b") as f:  # what a disk filling up mid-copy leaves
        f.truncate(full // 2)
    assert latest_checkpoint(tmp_path).name == "step-000001"  # the cheap check sees it too
    loaded = load_latest(tmp_path)
    assert loaded.step == 1
    assert f"state.pt has {full // 2} bytes, the manifest says {full} (truncated" in loaded.skipped[0].reason


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = save_checkpoint(tmp_path, 3, _training_state(3), meta={"config": {"x": 1}})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["format"] == 2
    assert sorted(manifest["files"]) == sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(path) is True


def test_missing_files_and_a_missing_manifest_make_a_checkpoint_incomplete(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"step": 1})
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        verify_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, {"step": 2})
    (path / "manifest.json").unlink()  # written last: without it the checkpoint never finished
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_checkpoint(path)
    renamed = save_checkpoint(tmp_path, 3, {"step": 3}).rename(checkpoint_root(tmp_path) / "step-000007")
    with pytest.raises(CheckpointError, match="manifest.json is for step 3, not the directory's step 7"):
        verify_checkpoint(renamed)
    with pytest.raises(CheckpointError, match="nothing to resume: no checkpoint in .* passes its checks"):
        load_latest(tmp_path)


def test_checkpoint_from_before_manifests_loads_unverified(tmp_path):
    old = checkpoint_root(tmp_path) / "step-000004"  # the layout the previous version wrote
    old.mkdir(parents=True)
    torch.save({"w": torch.arange(3.0), "step": 4}, old / "state.pt")
    (old / "meta.json").write_text(json.dumps({"step": 4, "config": {}}))
    assert verify_checkpoint(old) is False
    loaded = load_latest(tmp_path)
    assert loaded.step == 4 and not loaded.verified and torch.equal(loaded.state["w"], torch.arange(3.0))
    # The next save of the continued run writes a verified checkpoint and keeps the old one as the spare.
    save_checkpoint(tmp_path, 5, {"step": 5}, keep_last=2)
    assert sorted(p.name for p in checkpoint_root(tmp_path).glob("step-*")) == ["step-000004", "step-000005"]
    assert load_latest(tmp_path).verified


def test_no_checkpoint_at_all_says_how_to_start(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume: .* holds no checkpoint .*without --resume"):
        load_latest(tmp_path)


def test_a_broken_checkpoint_does_not_count_towards_those_kept(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=2)
    second = save_checkpoint(tmp_path, 2, {"step": 2}, keep_last=2)
    (second / "state.pt").write_bytes(b"")
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=2)
    # Keeping "the newest two" by name would have kept only 2 (broken) and 3; the intact 1 stays instead.
    assert sorted(p.name for p in checkpoint_root(tmp_path).glob("step-*")) == ["step-000001", "step-000003"]


def test_skipped_checkpoints_are_set_aside_so_pruning_keeps_the_continued_run(tmp_path):
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
    root = checkpoint_root(tmp_path)
    _flip_middle(root / "step-000003" / "state.pt")
    _flip_middle(root / "step-000004" / "state.pt")
    loaded = load_latest(tmp_path)
    assert loaded.step == 2 and [s.path.name for s in loaded.skipped] == ["step-000004", "step-000003"]
    assert [p.name for p in set_aside(loaded)] == ["rejected-step-000004", "rejected-step-000003"]
    assert (root / "latest").read_text().strip() == "step-000002"
    # The continued run saves step 3 with keep_last=1: pruning by name over the old directory would have
    # kept only the corrupt step 4 and deleted every intact checkpoint.
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=1)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000003"]
    assert load_latest(tmp_path).step == 3 and not load_latest(tmp_path).skipped
    assert sorted(p.name for p in root.glob("rejected-*")) == ["rejected-step-000003", "rejected-step-000004"]


def test_a_moved_run_directory_still_loads(tmp_path):
    save_checkpoint(tmp_path / "a", 1, _training_state(1))
    save_checkpoint(tmp_path / "a", 2, _training_state(2))
    shutil.move(tmp_path / "a", tmp_path / "b")
    loaded = load_latest(tmp_path / "b")
    assert loaded.step == 2 and loaded.verified and not loaded.skipped
    assert loaded.path == checkpoint_root(tmp_path / "b") / "step-000002"
