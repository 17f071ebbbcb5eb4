"""Which policy a path names: model directories, runs, their checkpoints and final exports; what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agentrl.driver.policy_source import resolve_policy
from agentrl.errors import CheckpointError, ConfigError
from agentrl.trainer.checkpoint import save_checkpoint


def _run(tmp_path: Path, model_dir: str, steps=(1, 2), final: bool = False) -> Path:
    """A run directory as `agentrl train` leaves it: its config, checkpoints (written by the real writer)."""
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"path": model_dir}, "env": {"id": "calculator-v0"}}))
    for step in steps:
        save_checkpoint(run, step, {"policy": {"w": torch.full((2,), float(step))}, "step": step}, keep_last=5)
    if final:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return run


def test_model_directory(tiny_model_dir):
    src = resolve_policy(tiny_model_dir)
    assert (src.model_dir, src.checkpoint, src.run_dir, src.step) == (tiny_model_dir, None, None, None)
    assert src.weights() is None


def test_run_with_final_means_the_final_export(tmp_path, tiny_model_dir):
    run = _run(tmp_path, tiny_model_dir, final=True)
    for given in (run, run / "final"):
        src = resolve_policy(given)
        assert src.model_dir == str(run / "final") and src.step == 2 and src.name == "myrun/final"


def test_unfinished_run_means_its_newest_checkpoint(tmp_path, tiny_model_dir):
    run = _run(tmp_path, tiny_model_dir)
    for given in (run, run / "checkpoints"):
        src = resolve_policy(given)
        assert src.checkpoint == run / "checkpoints" / "step-000002" and src.step == 2
        assert src.model_dir == tiny_model_dir  # the base model the weights go into
        assert src.name == "myrun/step-000002"
        assert torch.equal(src.weights()["w"], torch.full((2,), 2.0))
    older = resolve_policy(run / "checkpoints" / "step-000001")
    assert older.step == 1 and torch.equal(older.weights()["w"], torch.ones(2))


def test_corrupt_checkpoint_is_refused_when_read(tmp_path, tiny_model_dir):
    run = _run(tmp_path, tiny_model_dir, steps=(1,))
    state = run / "checkpoints" / "step-000001" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-20] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_policy(state.parent).weights()


def test_lora_checkpoint_is_refused_with_the_way_out(tmp_path, tiny_model_dir):
    run = tmp_path / "lora"
    (run).mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"path": tiny_model_dir}, "env": {"id": "calculator-v0"}}))
    save_checkpoint(run, 1, {"policy": {"base_model.model.q_proj.lora_A.default.weight": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="LoRA adapters.*final/ export"):
        resolve_policy(run).weights()


@pytest.mark.parametrize("case, expect", [
    ("missing", "--model '{p}' does not exist"),
    ("file", "--model '{p}' is a file"),
    ("empty", "--model '{p}' is not a model directory"),
    ("run-without-policy", "has neither a final/ model nor an intact checkpoint"),
    ("checkpoint-without-run-config", "is a checkpoint, but"),
])
def test_refusals(tmp_path, tiny_model_dir, case, expect):
    p = tmp_path / case
    if case == "file":
        p.write_text("x")
    elif case == "empty":
        p.mkdir()
    elif case == "run-without-policy":
        p.mkdir()
        (p / "config.json").write_text(json.dumps({"model": {"path": tiny_model_dir}, "env": {"id": "x"}}))
    elif case == "checkpoint-without-run-config":
        p = save_checkpoint(p, 3, {"policy": {}})
    with pytest.raises(ConfigError) as err:
        resolve_policy(p)
    assert expect.format(p=p) in str(err.value)
