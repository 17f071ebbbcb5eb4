"""Staging weights for vLLM's reload (agentrl/rollout/backends/vllm/weights.py) on a real tiny model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.errors import EngineError
from agentrl.rollout.backends.vllm import weights


def tiny_qwen2(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=50, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


def test_tied_head_is_written_once_like_save_pretrained(tmp_path):
    model = tiny_qwen2(tied=True)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    directory = weights.stage_weights(sd, str(tmp_path))
    loaded = load_file(os.path.join(directory, weights.WEIGHTS_FILE))
    # What save_pretrained writes for a tied model: the embedding, not the head (vLLM ties it back).
    model.save_pretrained(tmp_path / "hf")
    assert set(loaded) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    for name, t in loaded.items():
        assert torch.equal(t, sd[name])


def test_untied_head_and_views(tmp_path):
    sd = dict(tiny_qwen2(tied=False).state_dict())
    assert "lm_head.weight" in load_file(os.path.join(weights.stage_weights(sd, str(tmp_path)), "model.safetensors"))
    base = torch.arange(12.0)
    views = {"a": base[:6].view(2, 3), "b": base[6:].view(3, 2), "c": base.view(4, 3).t()}  # share one storage
    out = load_file(os.path.join(weights.stage_weights(views, str(tmp_path)), "model.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in views.items())


def test_discard_removes_only_staged_dirs(tmp_path):
    staged = weights.stage_weights({"w": torch.ones(2)}, str(tmp_path))
    mine = tmp_path / "user-model"
    mine.mkdir()
    weights.discard(str(mine))
    weights.discard(staged)
    assert mine.exists() and not os.path.exists(staged)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(EngineError, match="empty"):
        weights.stage_weights({}, str(tmp_path))
    with pytest.raises(EngineError, match="torch.Tensor"):
        weights.stage_weights({"w": [1.0, 2.0]}, str(tmp_path))
    with pytest.raises(EngineError, match="not a directory"):
        weights.check_weights_dir(str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="save_pretrained"):
        weights.check_weights_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing left behind by the refusals


def test_nccl_update_info_matches_vllm_field_names():
    info = weights.nccl_update_info({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4)})
    # NCCLWeightTransferUpdateInfo(names, dtype_names, shapes, packed, ...) in vLLM 0.24; dtype names are
    # looked up with getattr(torch, name) on the receiving side.
    assert info == {"names": ["a", "b"], "dtype_names": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
                    "packed": True}
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in info["dtype_names"])
