"""The built-in engine's defaults that depend on the device: the KV-cache budget and the step budget.

On CUDA the KV cache takes half of the accelerator memory free at load (the trainer of a colocated
run needs the rest) and a step computes up to 16,384 tokens, the best of the budgets swept on an
H200 (docs/benchmarks.md); on CPU the cache is 256 MiB and a step 4,096 tokens, the values every CPU
number in the docs and tests was made with.
"""

from __future__ import annotations

import torch

from agentrl.rollout.backends.embedded.kv_cache import PagedKVCache
from agentrl.rollout.backends.embedded.model_runner import ModelRunner

CPU_KV_BYTES = 256 * 2**20  # default KV budget on CPU
GPU_KV_FRACTION = 0.5  # default share of free accelerator memory for the KV cache
GPU_STEP_TOKENS = 16384  # default max_step_tokens on CUDA (H200 sweep, docs/benchmarks.md)
CPU_STEP_TOKENS = 4096  # on CPU, where long prompts are rare and every test and quickstart number was made


def kv_bytes_per_token(runner: ModelRunner) -> int:
    """Bytes of KV cache one token takes (all layers' K and V, the engine's dtype)."""
    return PagedKVCache.bytes_per_token(runner.num_layers, runner.num_kv_heads, runner.head_dim, runner.dtype)


def default_kv_tokens(runner: ModelRunner, device: torch.device, max_model_len: int, max_batch_size: int) -> int:
    """KV budget in tokens: the device's share, at least one longest sequence, at most what the batch can use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_KV_FRACTION)
    else:
        budget = CPU_KV_BYTES
    return max(max_model_len, min(budget // kv_bytes_per_token(runner), max_batch_size * max_model_len))


def default_step_tokens(device: torch.device) -> int:
    return GPU_STEP_TOKENS if device.type == "cuda" else CPU_STEP_TOKENS
