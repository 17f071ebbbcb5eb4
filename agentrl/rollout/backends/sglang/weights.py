"""Moving trainer weights into SGLang: tensors in-process, a safetensors folder for a server, and
the trainer's end of the NCCL weights group.

A server in another process cannot read this process's tensors, except through CUDA IPC handles
(`/update_weights_from_tensor`), which need the tensors on a GPU of the same machine and alive
until the server has copied them. A folder of safetensors works for every layout (CPU trainer,
other GPU, restart of a crashed server, which re-loads the current folder), so it is the default
for server mode: `WeightFolder` writes `model.safetensors` next to a copy of the model's config
files and SGLang's `/update_weights_from_disk` loads it.

`weights_group` is rank 0 of the process group SGLang's ranks join in `init_weights_update_group`
(its `rank_offset` and up). It forms the group the way SGLang 0.5.17's side does
(`srt/utils/common.py:init_custom_process_group`: a TCP rendezvous at `master_address:port`, a
store prefixed with the group name, torch's process-group constructor), so that the two agree;
it is a group of its own, beside any default group the trainer already has. The NCCL path has not
been run on this project's hardware; the rendezvous itself is tested on CPU with gloo.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch

_CONFIG_FILES = ("config.json", "generation_config.json")


def tensors_for_engine(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for `update_weights_from_tensor` (detached; SGLang maps HF names itself)."""
    return [(name, t.detach()) for name, t in state_dict.items() if isinstance(t, torch.Tensor)]


class WeightFolder:
    """Versions of the weights as folders SGLang can load (`config.json` + `model.safetensors`)."""

    def __init__(self, root: str | None, model_path: str, default_parent: str | None = None):
        self._own_root = root is None  # a folder of our choosing is deleted by cleanup()
        self.root = root
        self._default_parent = default_parent
        self.model_path = model_path
        self.current: str | None = None

    def write(self, state_dict: Mapping[str, torch.Tensor], version: int) -> str:
        """Write one version; returns its folder. Tensors sharing memory (tied embeddings) are copied
        apart, since safetensors refuses aliases."""
        from safetensors.torch import save_file

        if self.root is None:
            if self._default_parent is not None:
                os.makedirs(self._default_parent, exist_ok=True)
            self.root = tempfile.mkdtemp(prefix="sglang-weights-", dir=self._default_parent)
        path = os.path.join(self.root, f"v{version}-{uuid.uuid4().hex[:8]}")
        os.makedirs(path)
        for name in _CONFIG_FILES:
            src = os.path.join(self.model_path, name)
            if os.path.exists(src):
                shutil.copy(src, path)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()
                   if isinstance(v, torch.Tensor)}
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path

    def keep_only(self, path: str) -> None:
        """`path` is what the engine runs now: earlier versions are deleted."""
        if self.root is not None:
            for entry in os.listdir(self.root):
                full = os.path.join(self.root, entry)
                if full != path and entry.startswith("v"):
                    shutil.rmtree(full, ignore_errors=True)
        self.current = path

    def cleanup(self) -> None:
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def weights_group(master_address: str, master_port: int, world_size: int, *, rank: int = 0,
                  group_name: str = "agentrl-weights", backend: str = "nccl", timeout_s: float = 600.0):
    """The trainer's end (rank 0) of the weights group that SGLang joins; returns the process group.

    Use it as `init_weights_group(..., join=lambda: weights_group(...))` and broadcast each tensor
    with `torch.distributed.broadcast(t, src=0, group=pg)` inside `update_weights_distributed`.
    Rank 0 hosts the rendezvous store; `rank` is there for tests that play the other side.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                             timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = c10d._new_process_group_helper(size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
                                           group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(size)}
    return pg


def run_alongside(engine_side: Callable[[], Any], join: Callable[[], Any] | None) -> Any:
    """Run `engine_side` in a thread while `join` runs here (both block until the other side arrives)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            engine_side()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=run, name="agentrl-sglang-join", daemon=True)
    thread.start()
    joined = join() if join is not None else None
    thread.join()
    if "error" in result:
        raise result["error"]
    return joined
