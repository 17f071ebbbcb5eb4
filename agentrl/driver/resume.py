"""Saving and restoring a whole run (what `agentrl train --resume` needs), and the guard that stops
a run whose updates keep going non-finite.

A run's state is the policy, the optimizer and scheduler (with PPO, the critic's three too), the RNG
states and the guard's counters; the data position is the step number itself (task seeds are a
function of the step). Resuming loads the newest checkpoint that passes its integrity checks (see
`agentrl.trainer.checkpoint`), warns about and sets aside newer ones that fail, and checks that the
config still describes the same run: only the step count, evaluation and checkpoint settings, and the
run directory's place may change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import BaseModel

from agentrl.config import Config
from agentrl.errors import TrainerError
from agentrl.trainer.checkpoint import (
    latest_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)

logger = logging.getLogger(__name__)

# Config keys that may differ between a run and its continuation.
# run_dir may change: a run directory can be moved and resumed from its new place.
# The failure bounds may change too (a run stopped by too many timeouts continues with longer ones);
# the failure policies may not: they decide what is trained on.
_MAY_CHANGE = {"train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
               "failures.min_group_fraction", "failures.episode_timeout_s", "failures.request_timeout_s", "run_dir"}


def _field_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Dotted key -> default value of every config field that has one (as `model_dump(mode="json")` writes it)."""
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_field_defaults(ann, key + "."))
        elif not field.is_required():
            value = field.get_default(call_default_factory=True)
            out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else (
                list(value) if isinstance(value, tuple) else value)
    return out


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient norm; too many in a row stop the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def observe(self, nonfinite: bool) -> float:
        """Record one step; returns the running total of skipped non-finite steps."""
        self.consecutive = self.consecutive + 1 if nonfinite else 0
        self.total += int(nonfinite)
        return float(self.total)

    @property
    def tripped(self) -> bool:
        """`limit` non-finite steps came in a row: `check` will stop the run."""
        return self.consecutive >= self.limit

    def check(self, step: int, run_dir: str | Path) -> None:
        """Raise TrainerError once `limit` non-finite steps came in a row."""
        if not self.tripped:
            return
        last = latest_checkpoint(run_dir)
        where = (f"the last good checkpoint is {last}; lower optim.lr or check the rewards, then continue "
                 "with `agentrl train CONFIG --resume`" if last else
                 "no checkpoint was saved yet (see train.checkpoint_every)")
        raise TrainerError(f"stopping at step {step}: {self.consecutive} steps in a row had a non-finite loss "
                           f"or gradient norm and were skipped; {where}")

    def state(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _fixed(flat: dict[str, object]) -> dict[str, object]:
    """The keys that must not change on resume (where the run's parts run, `cluster.*`, may: a run can
    continue on more or fewer workers; so may the engine and its server: another machine may have
    SGLang where the first had vLLM, or its server at another URL)."""
    return {k: v for k, v in flat.items()
            if k not in _MAY_CHANGE and not k.startswith(("eval.", "metrics.", "cluster.", "rollout.engine",
                                                           "rollout.server"))}


def _identity(cfg: Config) -> dict[str, object]:
    return _fixed(_flat(cfg.model_dump(mode="json")))


def save_run(run_dir: str | Path, cfg: Config, step: int, policy: torch.nn.Module, optimizer, scheduler,
             guard: NonFiniteGuard, critic: tuple | None = None) -> Path:
    """Checkpoint the run after `step` completed steps; `critic` is PPO's (value model, optimizer,
    scheduler), saved beside the policy's."""
    state = {"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "guard": guard.state(), "step": step}
    if critic is not None:
        state["critic"] = {name: part.state_dict() for name, part in zip(_CRITIC_PARTS, critic)}
    return save_checkpoint(run_dir, step, state, meta={"config": _identity(cfg)}, keep_last=cfg.train.keep_checkpoints)


_CRITIC_PARTS = ("model", "optimizer", "scheduler")


class SetAside(NamedTuple):
    """A newer checkpoint that failed its checks: its name, why, and the name it was renamed to."""

    checkpoint: str
    reason: str
    renamed_to: str


@dataclass(frozen=True)
class Restored:
    """Where a resumed run starts: the completed step count, the checkpoint it came from (a name inside
    `run_dir/checkpoints`), whether that checkpoint's bytes were verified, and the newer ones skipped."""

    step: int
    checkpoint: str
    verified: bool
    skipped: tuple[SetAside, ...] = ()

    def events(self) -> list[dict[str, object]]:
        """Records for the run's metrics.jsonl: one per skipped checkpoint, then the resume itself."""
        out: list[dict[str, object]] = [{"event": "checkpoint_skipped", "checkpoint": s.checkpoint, "reason": s.reason,
                                         "set_aside_as": s.renamed_to} for s in self.skipped]
        out.append({"event": "resume", "from_step": self.step, "checkpoint": self.checkpoint,
                    "verified": self.verified})
        return out


def restore_run(run_dir: str | Path, cfg: Config, policy: torch.nn.Module, optimizer, scheduler,
                guard: NonFiniteGuard, critic: tuple | None = None) -> Restored:
    """Load the newest intact checkpoint of `run_dir` into the given objects (and PPO's critic, a
    (value model, optimizer, scheduler) triple, when given).

    Newer checkpoints that fail their checks are reported (a warning on the console) and renamed to
    `rejected-step-NNNNNN`, so the continued run neither loads nor counts them again.
    """
    loaded = load_latest(run_dir)
    path, state, meta = loaded.path, loaded.state, loaded.meta
    # Filtered again: checkpoints of earlier versions recorded keys that may now change (run_dir).
    saved, now = _fixed(meta.get("config", {})), _identity(cfg)
    # A field added to the config after the checkpoint was written counts as unchanged at its default.
    defaults = _field_defaults(type(cfg))
    saved.update({k: defaults[k] for k in now if k not in saved and k in defaults})
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise TrainerError(f"cannot resume {path}: the config differs from the run's ({detail}). Only "
                           f"{', '.join(sorted(_MAY_CHANGE))}, eval.*, metrics.*, cluster.*, rollout.engine, "
                           "rollout.engine_options.* and rollout.server.* may change on resume")
    step = int(state["step"])
    if step > cfg.train.steps:
        raise TrainerError(f"{path} is at step {step}, past train.steps={cfg.train.steps}; raise train.steps")
    if critic is not None and "critic" not in state:
        raise TrainerError(f"cannot resume {path}: it holds no critic state, and algorithm.advantage=gae trains one")
    policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, part in zip(_CRITIC_PARTS, critic or ()):
        part.load_state_dict(state["critic"][name])
    guard.load(state["guard"])
    set_rng_state(state["rng"])
    moved = set_aside(loaded)
    for skip, new in zip(loaded.skipped, moved):
        logger.warning("checkpoint %s skipped and renamed to %s: %s", skip.path.name, new.name, skip.reason)
    if loaded.skipped:
        logger.warning("resuming from the newest intact checkpoint, %s (step %d)", path.name, step)
    if not loaded.verified:
        logger.warning("checkpoint %s has no manifest (written before checkpoints carried checksums): loaded "
                       "without verifying its bytes", path.name)
    return Restored(step, path.name, loaded.verified,
                    tuple(SetAside(s.path.name, s.reason, m.name) for s, m in zip(loaded.skipped, moved)))
