"""Host-to-device copies that never wait for the device.

A `non_blocking` copy from pageable host memory can still wait until the device has caught up
with its stream, which would undo the engine's overlap of host and device (async steps). Every
small host-to-device transfer of the engine goes through `to_device`, which stages it in pinned
memory on CUDA (PyTorch's caching host allocator keeps the block alive until the copy ran).
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (a host tensor) on `device`, copied without waiting for the device."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
