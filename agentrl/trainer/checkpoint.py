"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `checkpoints/step-000012/` holding `state.pt` (model, optimizer,
scheduler, RNG states, counters) and `meta.json`. It is written under a temporary name, every file
and the directory are fsynced, the directory is renamed into place, and only then is the
`checkpoints/latest` pointer replaced (also write-temp-fsync-rename). A crash at any moment leaves
either the previous checkpoint as `latest` or the new one, never half of one; leftovers of an
interrupted save (`.tmp-*`) are removed by the next save.

Only the process with rank 0 writes; the state it is given is a full (unsharded) state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import TrainerError

_PREFIX = "step-"
_TMP = ".tmp-"
LATEST = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """The RNG states a run consumes: Python's, torch's CPU generator and (when present) CUDA's."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{_TMP}{LATEST}-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
                    keep_last: int = 2) -> Path:
    """Write `state` (anything `torch.save` takes) as the checkpoint of `step`; returns its directory.

    Args:
        run_dir: The run directory; checkpoints go to `run_dir/checkpoints/`.
        step: The number of completed training steps the state reflects.
        state: Model, optimizer, scheduler, RNG and counter states.
        meta: Small JSON-able facts shown by humans and checked on resume (step, config digest).
        keep_last: Complete checkpoints kept; older ones are deleted after `latest` moves.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP}*"):  # an interrupted earlier save
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    name = f"{_PREFIX}{step:06d}"
    tmp = root / f"{_TMP}{name}-{os.getpid()}"
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2, sort_keys=True))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume) replaces it atomically enough: old is complete
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_pointer(root, name)
    for old in sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory (`step-000012` -> 12)."""
    return int(Path(path).name.removeprefix(_PREFIX))


def _complete(path: Path) -> bool:
    return (path / "state.pt").is_file() and (path / "meta.json").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points to; if the pointer is missing or broken, the newest complete one."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.name.startswith(_PREFIX) and _complete(target):
            return target
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint directory."""
    path = Path(path)
    if not _complete(path):
        raise TrainerError(f"{path} is not a complete checkpoint (expected state.pt and meta.json)")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, not raised raw
        raise TrainerError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    return state, meta
