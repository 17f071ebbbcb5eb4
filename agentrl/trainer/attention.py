"""Padding-free attention for unmodified Hugging Face models.

`agentrl_varlen` is registered in transformers' attention interface. Models loaded with
`attn_implementation="agentrl_varlen"` receive `cu_seq_lens_q`/`max_length_q` (passed through the
model's forward kwargs) and attend within each packed sequence only:

- `flash_attn.flash_attn_varlen_func` when the package is installed (CUDA);
- else PyTorch's built-in FlashAttention varlen kernel `torch.nn.attention.varlen.varlen_attn` (CUDA);
- else scaled-dot-product attention per sequence (CPU), which is exact and needs no mask tensor.

Models pass two options that change the numbers, and both are honoured: `sliding_window` (Mistral,
Gemma 2/3, ...: a query sees itself and the `W - 1` keys before it, as transformers' masks define it)
and `softcap` (Gemma 2: `scores = c * tanh(scores / c)` before the softmax). flash-attn takes both;
torch's `varlen_attn` takes a window but no softcap, so softcapped attention falls back to an exact
per-sequence computation there. Any other option a model passes that would change the result (e.g.
attention sinks) is refused with an error rather than ignored.

Letters: N packed tokens, H query heads, Hk key/value heads, D head dim, n one sequence's tokens.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from agentrl.errors import TrainerError

IMPLEMENTATION = "agentrl_varlen"
_registered = False
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None  # once, outside any compiled region
# Options transformers passes to every attention function that do not change the result.
_NEUTRAL_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
                             "dropout", "is_causal", "output_attentions", "use_cache", "cache_position",
                             "layer_idx", "past_key_values", "past_key_value", "attention_mask",
                             "output_hidden_states", "return_dict"})


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sequence_mask(n: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [n, n] keys-visible mask: causal, and within the last `window` positions; None when a
    plain causal mask says the same (no window, or one longer than the sequence)."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    diff = i.unsqueeze(1) - i.unsqueeze(0)  # [n, n]: query - key
    return (diff >= 0) & (diff < window)


def _softcapped(q, k, v, scale: float, softcap: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one sequence with capped scores, in float32. q: [H, n, D], k/v: [H, n, D] -> [H, n, D]."""
    n = q.shape[1]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [H, n, n]
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v.float()).to(q.dtype)


@torch.compiler.disable  # a Python loop over sequences: compiling it would specialise on their count
def _per_sequence(q, k, v, cu: torch.Tensor, scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """q: [N, H, D], k/v: [N, Hk, D] -> [N, H, D], causal (and windowed) within each sequence."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H or Hk, n, D]
        mask = _sequence_mask(end - start, window, q.device)
        if softcap:
            o = _softcapped(qs, ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0), scale, softcap, mask)
        elif mask is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=groups > 1)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
        out[start:end] = o.transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Causal attention over packed sequences. q: [N, H, D], k/v: [N, Hk, D] -> [N, H, D].

    `window`: a query attends to itself and the `window - 1` keys before it (None: all earlier keys).
    `softcap`: scores become `softcap * tanh(scores / softcap)` before the softmax (None: off).

    The FlashAttention kernels take fp16/bf16 only. Under CUDA autocast, q/k/v can arrive in
    float32 (HF's rotary embedding multiplies by float32 cos/sin), so they are cast to the autocast
    dtype, as SDPA would do; a float32 model without autocast takes the exact SDPA path instead.
    """
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    left = -1 if window is None else window - 1
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH_ATTN:
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True,
                                          window_size=(left, 0), softcap=softcap or 0.0)
        if not softcap:
            from torch.nn.attention.varlen import varlen_attn

            groups = q.shape[1] // k.shape[1]
            return varlen_attn(q, _repeat_kv(k, groups), _repeat_kv(v, groups), cu, cu, max_len, max_len,
                               scale=scale, window_size=(left, 0))
    return _per_sequence(q, k, v, cu, scale, window, softcap)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry: query [1, H, N, D], key/value [1, Hk, N, D]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError("agentrl_varlen attention needs cu_seq_lens_q; call the model through "
                           "agentrl.trainer.actor.forward_packed")
    if query.shape[0] != 1:
        raise RuntimeError("agentrl_varlen expects one packed row (batch size 1)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = kwargs.pop("sliding_window", None), kwargs.pop("softcap", None)
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL_KWARGS and v is not None)
    if unknown:
        raise TrainerError(f"{type(module).__name__} passes attention options {unknown} that agentrl's packed "
                           "attention does not implement; training this model would compute wrong logprobs. "
                           "Supported: sliding_window, softcap (see docs/architectures.md)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    out = varlen_attention(q, k, v, cu.to(q.device, torch.int32), int(kwargs.get("max_length_q") or q.shape[0]),
                           scale, window, softcap)
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
