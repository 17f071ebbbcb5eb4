"""Padding-free attention for unmodified Hugging Face models.

`agentrl_varlen` is registered in transformers' attention interface. Models loaded with
`attn_implementation="agentrl_varlen"` receive `cu_seq_lens_q`/`max_length_q` (passed through the
model's forward kwargs) and attend within each packed sequence only:

- `flash_attn.flash_attn_varlen_func` when the package is installed (CUDA);
- else PyTorch's built-in FlashAttention varlen kernel `torch.nn.attention.varlen.varlen_attn` (CUDA);
- else scaled-dot-product attention per sequence (CPU), which is exact and needs no mask tensor.

Letters: N packed tokens, H query heads, Hk key/value heads, D head dim.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

IMPLEMENTATION = "agentrl_varlen"
_registered = False
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None  # once, outside any compiled region


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@torch.compiler.disable  # a Python loop over sequences: compiling it would specialise on their count
def _per_sequence_sdpa(q, k, v, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [N, H, D], k/v: [N, Hk, D] -> [N, H, D], causal within each sequence."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H or Hk, n, D]
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Causal attention over packed sequences. q: [N, H, D], k/v: [N, Hk, D] -> [N, H, D].

    The FlashAttention kernels take fp16/bf16 only. Under CUDA autocast, q/k/v can arrive in
    float32 (HF's rotary embedding multiplies by float32 cos/sin), so they are cast to the autocast
    dtype, as SDPA would do; a float32 model without autocast takes the exact SDPA path instead.
    """
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH_ATTN:
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
        from torch.nn.attention.varlen import varlen_attn

        groups = q.shape[1] // k.shape[1]
        return varlen_attn(q, _repeat_kv(k, groups), _repeat_kv(v, groups), cu, cu, max_len, max_len,
                           scale=scale, window_size=(-1, 0))
    return _per_sequence_sdpa(q, k, v, cu, scale)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry: query [1, H, N, D], key/value [1, Hk, N, D]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError("agentrl_varlen attention needs cu_seq_lens_q; call the model through "
                           "agentrl.trainer.actor.forward_packed")
    if query.shape[0] != 1:
        raise RuntimeError("agentrl_varlen expects one packed row (batch size 1)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    out = varlen_attention(q, k, v, cu.to(q.device, torch.int32), int(kwargs.get("max_length_q") or q.shape[0]), scale)
    return out.unsqueeze(0), None  # [1, N, H, D]: HF reshapes to [1, N, H*D]


def register_varlen_attention() -> str:
    """Register `agentrl_varlen` with transformers (idempotent) and return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

        AttentionInterface.register(IMPLEMENTATION, _hf_attention)
        # No mask tensor is built: sequence boundaries come from cu_seqlens.
        AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)
        _registered = True
    return IMPLEMENTATION
