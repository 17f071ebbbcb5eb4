"""Shared fixtures: a tiny real model (tokenizer trained here, random or briefly trained weights)."""

from __future__ import annotations

import os

import pytest
import torch

# Ray starts its workers at nice 15 by default, so on a 2-core CI machine a rollout worker waits for
# any normal-priority work (this process training, another test's subprocess) and the Ray tests'
# health checks and deadlines measure the scheduler, not the code. The suite's Ray (and the
# `agentrl train` subprocesses it starts, which inherit this) gives workers the driver's priority.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2 model with the calculator tokenizer and chat template; a few SFT steps only.

    `AGENTRL_TEST_MODEL_DIR` points at a prebuilt one instead (the GPU machine lacks the packages the
    recipe imports, so the conformance suite runs there on a copy built here).
    """
    if os.environ.get("AGENTRL_TEST_MODEL_DIR"):
        return os.environ["AGENTRL_TEST_MODEL_DIR"]
    from agentrl.recipes.tiny_model import TinyModelShape, build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    shape = TinyModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    build_tiny_model(out, "calculator-v0", shape=shape, demos=64, sft_steps=3, batch_seqs=8, seed=0)
    return str(out)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def stopping_model_dir(tmp_path_factory) -> str:
    """Like `tiny_model_dir` but warm-started enough (40 steps at lr 1e-2) to end its turns with the
    end-of-turn token, so episodes reach the env and earn rewards that differ within a group."""
    from agentrl.recipes.tiny_model import TinyModelShape, build_tiny_model

    out = tmp_path_factory.mktemp("stopping-model")
    torch.manual_seed(0)
    shape = TinyModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    build_tiny_model(out, "calculator-v0", shape=shape, demos=64, sft_steps=40, batch_seqs=8, lr=1e-2, seed=0)
    return str(out)
