"""Getting the trainer's weights into vLLM 0.24.

Disk (the default, both modes): the state dict is written as one `model.safetensors` into a fresh
directory, and vLLM's workers load it in place with their own `reload_weights(weights_path=...)`
(`vllm/v1/worker/gpu_model_runner.py`): the model's `load_weights` under vLLM's layerwise
reload, so vLLM's name mapping, fused q/k/v and gate/up layouts and tied embeddings apply exactly
as at start-up. In-process the call is `AsyncLLM.collective_rpc("reload_weights", ...)`; against a
server it is `POST /collective_rpc` (a dev-mode endpoint, `VLLM_SERVER_DEV_MODE=1`), so the
server must see the directory (same host, or `staging_dir` on a shared filesystem). Why disk
and not tensors over the RPC: 0.24's RPC encodes arguments with msgpack, which carries a tensor
only as a raw buffer the receiving side cannot rebuild without a worker extension, and CUDA IPC
handles only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (pickle); the directory costs one write
and one read of the weights (about 1 GB for a 0.5B model in bf16) and needs neither.

NCCL (`weight_sync="nccl"`, server mode; written from vLLM 0.24's `NCCLWeightTransferEngine` and
its `/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update` endpoints, NOT RUN on this project's machines): agentrl's process joins a
stateless NCCL group with the server's workers as rank 0 and broadcasts each tensor from its GPU
while the server receives them into `load_weights`. The server must start with
`--weight-transfer-config '{"backend": "nccl"}'`, and vllm must be importable in agentrl's process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

import torch

from agentrl.errors import EngineError

WEIGHTS_FILE = "model.safetensors"


def unique_tensors(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The tensors of `state_dict` as safetensors can write them: tied copies dropped, views cloned.

    A name whose tensor is exactly another's (tied embeddings: `lm_head.weight` is
    `model.embed_tokens.weight`) is dropped, the first name kept, as `save_pretrained` does; vLLM
    ties them again from the model's config. A tensor that shares storage in any other way is
    copied (safetensors refuses shared storage).
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise EngineError(f"weight {name!r} is a {type(t).__name__}, not a torch.Tensor; pass a plain state dict "
                              "(full tensors, not shards)")
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue
        seen[key] = name
        shared = ptr in storages and ptr != 0
        storages.add(ptr)
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
    return out


def stage_weights(state_dict: Mapping[str, object], parent: str | None = None) -> str:
    """Write `state_dict` as `<new dir>/model.safetensors` under `parent` (default: the temp dir);
    returns the directory. The caller removes it (`discard`) once vLLM has loaded it and it is no
    longer the latest (a restarted server reloads the latest)."""
    from safetensors.torch import save_file

    tensors = unique_tensors(state_dict)
    if not tensors:
        raise EngineError("update_weights got an empty state dict")
    directory = tempfile.mkdtemp(prefix="agentrl-vllm-weights-", dir=parent)
    try:
        save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def discard(directory: str | None) -> None:
    """Remove a directory `stage_weights` made (never anything else)."""
    if directory and os.path.basename(directory).startswith("agentrl-vllm-weights-"):
        shutil.rmtree(directory, ignore_errors=True)


def check_weights_dir(path: str) -> None:
    """Refuse a directory vLLM's loader would find nothing in (before the engine is paused for it)."""
    if not os.path.isdir(path):
        raise EngineError(f"weights path {path!r} is not a directory; give a Hugging Face model directory "
                          "(safetensors or .bin files)")
    if not any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(path)):
        raise EngineError(f"no *.safetensors / *.bin weights in {path!r}; save the model with save_pretrained")


def nccl_update_info(tensors: Mapping[str, torch.Tensor], packed: bool = True) -> dict:
    """The `update_info` of vLLM 0.24's NCCL transfer (`NCCLWeightTransferUpdateInfo`) for `tensors`,
    in the order they are broadcast. Not run here (see the module docstring)."""
    return {"names": list(tensors), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
            "shapes": [list(t.shape) for t in tensors.values()], "packed": packed}
