"""Checks that run before any work: the device, the model directory, the env and its splits.

A run that cannot work should fail in its first second with one line that names the field and the
fix, not after minutes of loading, and never by training on nothing: a device this machine lacks, a
model directory without a model, an env that does not build, a split it does not have, tasks whose
prompts leave no room for the model's turn. Each check raises `ConfigError` (the input is wrong) or
`EnvError` (the env's own code failed) with that line; third-party exceptions (transformers,
torch) are caught at this boundary and reported by type and first line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from agentrl.envs.core import Env
from agentrl.envs.registration import make
from agentrl.errors import AgentRLError, ConfigError, EnvError, did_you_mean

# Seeds per split whose prompts are rendered to check they fit; prompts of one env vary little.
PROBE_SEEDS = 4
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, short enough for one console line."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def reported(what: str, fix: str) -> Iterator[None]:
    """Turn any exception of the block (a third-party loader's) into a one-line `ConfigError`."""
    try:
        yield
    except AgentRLError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: whatever a loader raises becomes one clear line
        raise ConfigError(f"{what}: {first_line(exc)}; {fix}") from None


def check_device(device: str, field: str = "model.device") -> None:
    """Refuse a device this machine does not have (`cuda` without a visible GPU, `cuda:3` of 2); `field` names
    the config field that asked for it."""
    kind = torch.device(device)
    if kind.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}={device} but PyTorch sees no CUDA GPU on this machine (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use {field}=cpu")
    count = torch.cuda.device_count()
    if kind.index is not None and kind.index >= count:
        raise ConfigError(f"{field}={device} but this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1}); pick one of those")


def check_model_dir(path: str, field: str, max_total_tokens: int) -> None:
    """Refuse a model directory that cannot hold a causal LM before anything loads it.

    Args:
        path: The directory.
        field: How the user gave it (`model.path`, `--model`), for the message.
        max_total_tokens: rollout.max_total_tokens, checked against the model's positions.
    """
    p = Path(path)
    build = f"build one with `agentrl tiny-model --out {path}` or point {field} at a saved Hugging Face model"
    if not p.exists():
        raise ConfigError(f"{field} {path!r} does not exist; {build}")
    if not p.is_dir():
        raise ConfigError(f"{field} {path!r} is a file, not a model directory; {build}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{field} {path!r} has no config.json, so it is not a Hugging Face model directory; {build}")
    try:
        config = json.loads(cfg_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field} {path!r}: config.json is not valid JSON ({first_line(exc)}); "
                          "restore it from the model's source") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{field} {path!r}: config.json has no \"model_type\", so it is not a transformers "
                          "model config; restore it from the model's source")
    if not any(any(p.glob(pattern)) for pattern in _WEIGHTS):
        raise ConfigError(f"{field} {path!r} has no weights (*.safetensors or pytorch_model*.bin); "
                          "save the model with model.save_pretrained(path)")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"{field} {path!r} has no tokenizer ({' or '.join(_TOKENIZER_FILES[:2])}); "
                          "save it next to the model with tokenizer.save_pretrained(path)")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and max_total_tokens > positions:
        raise ConfigError(f"rollout.max_total_tokens={max_total_tokens} is more than the model's "
                          f"max_position_embeddings={positions} ({path}); lower rollout.max_total_tokens")


def build_env(env_id: str, kwargs: dict[str, Any]) -> Env:
    """`make(env_id, **kwargs)`, with whatever the env's constructor raises reported on one line."""
    try:
        return make(env_id, **kwargs)
    except AgentRLError:
        raise
    except Exception as exc:  # noqa: BLE001 - the env's own code; its error is the message
        raise EnvError(f"building env {env_id!r} with env.kwargs {sorted(kwargs)} raised {first_line(exc)}; "
                       f"fix env.kwargs or the env (`agentrl check-env {env_id}` runs its contract checks)") from None


def check_splits(env: Env, env_id: str, splits: Sequence[tuple[str, str]], prompt_length,
                 max_total_tokens: int, max_tokens_per_turn: int) -> None:
    """Every split a run will play exists, its first tasks reset, and their prompts leave room for a turn.

    Args:
        env: A built env (reset here on a few seeds of each split).
        env_id: Its id, for messages.
        splits: (split, where it was given), e.g. ("train", "env.train_split").
        prompt_length: `messages -> int`, the rendered prompt's token count.
        max_total_tokens, max_tokens_per_turn: The episode bounds (rollout.*).
    """
    for split, field in splits:
        if split not in env.splits:
            raise ConfigError(f"{field}={split!r}: env {env_id!r} has no such split.{did_you_mean(split, env.splits)} "
                              f"Its splits: {', '.join(env.splits)}")
        for seed in range(PROBE_SEEDS):
            try:
                obs, _ = asyncio.run(env.areset(seed=seed, options={"split": split}))
            except Exception as exc:  # noqa: BLE001 - the env's own code; its error is the message
                raise EnvError(f"env {env_id!r} fails to start a task: reset(seed={seed}, split={split!r}) raised "
                               f"{first_line(exc)}; fix the env (`agentrl check-env {env_id}` runs its contract "
                               "checks)") from None
            length = prompt_length(list(obs))
            if length + max_tokens_per_turn > max_total_tokens:
                room = max(max_total_tokens - length, 0)
                raise ConfigError(
                    f"rollout.max_total_tokens={max_total_tokens} leaves {room} tokens for the model's first turn: the "
                    f"prompt of {split!r} task {seed} is {length} tokens and a turn may be rollout.max_tokens_per_turn="
                    f"{max_tokens_per_turn}; raise rollout.max_total_tokens to at least {length + max_tokens_per_turn}")
