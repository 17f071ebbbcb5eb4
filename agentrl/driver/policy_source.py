"""Which policy a path names: a Hugging Face model directory, a training checkpoint or a whole run.

`agentrl eval` takes any of the three. An HF directory loads as it is. A checkpoint
(`RUN/checkpoints/step-000012`) holds the trainer's state, not a model directory: the engine loads
the run's base model (`model.path` of `RUN/config.json`) and then the checkpoint's policy weights
over it, so no trainable copy of the model is ever built. A run directory means its finished policy
(`RUN/final`, exported after the last step) or, while the run is unfinished, its newest intact
checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import CheckpointError, ConfigError
from agentrl.trainer.checkpoint import MANIFEST, STATE, checkpoint_root, checkpoint_step, latest_checkpoint, load_checkpoint


@dataclass(frozen=True)
class PolicySource:
    """A policy to evaluate.

    Attributes:
        given: The path as the user gave it (for messages and result names).
        model_dir: The HF directory the tokenizer and the engine load.
        checkpoint: A checkpoint whose policy weights replace model_dir's, or None.
        run_dir: The training run it comes from, or None for a bare model directory.
        step: Training steps the policy has had (None for a bare model directory).
    """

    given: str
    model_dir: str
    checkpoint: Path | None = None
    run_dir: Path | None = None
    step: int | None = None

    @property
    def name(self) -> str:
        """A short name for tables and result files: `RUN/final`, `RUN/step-000012` or the directory's name."""
        if self.run_dir is not None:
            return f"{self.run_dir.resolve().name}/{self.checkpoint.name if self.checkpoint else 'final'}"
        return Path(self.model_dir).resolve().name or "model"

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's policy weights under plain HF names (None for a model directory).

        Raises:
            CheckpointError: the checkpoint fails its manifest, or holds LoRA adapters (evaluate the run's
                `final/` export instead: it has them merged).
        """
        if self.checkpoint is None:
            return None
        state, _ = load_checkpoint(self.checkpoint)
        policy = state.get("policy")
        if not isinstance(policy, dict):
            raise CheckpointError(f"checkpoint {self.checkpoint} holds no policy weights; evaluate another checkpoint")
        if any(".lora_" in key for key in policy):
            raise CheckpointError(f"checkpoint {self.checkpoint} holds LoRA adapters, which `agentrl eval` does not "
                                  f"merge; evaluate the run's final/ export (LoRA merged), or continue the run to "
                                  "its end to write it")
        return policy


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.json as a dict when `run_dir` holds an agentrl run's config, else None."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("env"), dict):
        return data
    return None


def _checkpoint_source(given: str, ckpt: Path, field: str) -> PolicySource:
    run = ckpt.parent.parent
    cfg = read_run_config(run)
    if cfg is None or not isinstance(cfg["model"].get("path"), str):
        raise ConfigError(f"{field} {given!r} is a checkpoint, but {run / 'config.json'} (the run's config, which names "
                          "the base model its weights go into) is missing or unreadable; evaluate the run's "
                          "final/ model directory instead")
    return PolicySource(given, cfg["model"]["path"], checkpoint=ckpt, run_dir=run, step=checkpoint_step(ckpt))


def resolve_policy(path: str | Path, field: str = "--model") -> PolicySource:
    """The policy `path` names (see the module docstring); a path that names none is a `ConfigError`.

    Args:
        path: A model directory, a run directory, its `checkpoints/` or one checkpoint in it.
        field: How the user gave it, for messages.

    Example:
        >>> resolve_policy("runs/calculator").model_dir        # doctest: +SKIP
        'runs/calculator/final'
    """
    given = str(path)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{field} {given!r} does not exist; give a model directory, a run directory or a checkpoint "
                          "(RUN/checkpoints/step-N)")
    if not p.is_dir():
        raise ConfigError(f"{field} {given!r} is a file; give a model directory, a run directory or a checkpoint "
                          "directory")
    if (p / STATE).is_file() or (p / MANIFEST).is_file():
        return _checkpoint_source(given, p, field)
    if p.name == "final" and read_run_config(p.parent) is not None:  # a run's exported policy
        p = p.parent
    if p.name == "checkpoints" and read_run_config(p.parent) is not None:
        p = p.parent
    if read_run_config(p) is not None:
        last = latest_checkpoint(p)
        if (p / "final" / "config.json").is_file():
            steps = checkpoint_step(last) if last else None
            return PolicySource(given, str(p / "final"), run_dir=p, step=steps)
        if last is None:
            raise ConfigError(f"{field}: run {given!r} has neither a final/ model nor an intact checkpoint in "
                              f"{checkpoint_root(p)}; it has no policy to evaluate yet")
        return _checkpoint_source(given, last, field)
    if (p / "config.json").is_file():
        return PolicySource(given, given)
    raise ConfigError(f"{field} {given!r} is not a model directory (no config.json), a run directory or a "
                      "checkpoint; give one of those")
