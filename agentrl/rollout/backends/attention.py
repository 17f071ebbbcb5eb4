"""Attention of one engine step over the paged KV cache, and the per-step metadata it needs.

A step's tokens are flat: first the decode group (one new token per sequence), then the prefill
group (a chunk of new tokens per sequence, whose earlier positions may come from the prefix
cache). `StepMetadata` holds what both groups need, built once per step and shared by all layers.

Two implementations of one interface:
- `SdpaPagedAttention` (CPU, and any device without the kernels): gathers each sequence's blocks
  with `index_select` into a reused scratch buffer and calls PyTorch SDPA with a length mask. For
  decode it folds the G query heads of a KV head into the query axis (`[B, Hkv, G, D]`), which
  is GQA without repeating K/V.
- `KernelPagedAttention` (CUDA): the Triton kernels of `backends/kernels/paged_attention.py`.

Letters: N tokens in the step, Bd decode sequences, Bp prefill sequences, T longest prefill chunk,
Hq query heads, Hkv KV heads (G = Hq / Hkv), D head dim, P block size, M block-table width,
L = M * P key positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StepMetadata:
    """Tensors describing one step (all on the engine's device)."""

    slots: torch.Tensor  # [N] int64 cache slot of each new token (block * P + offset)
    num_decode: int  # Bd: the first Bd tokens are decodes
    decode_block_table: torch.Tensor | None  # [Bd, Md] int32
    decode_seq_lens: torch.Tensor | None  # [Bd] int32, new token included
    prefill_block_table: torch.Tensor | None  # [Bp, Mp] int32
    prefill_seq_lens: torch.Tensor | None  # [Bp] int32, total tokens after the chunk
    prefill_cu_q: torch.Tensor | None  # [Bp + 1] int32 offsets of each chunk in the prefill group
    prefill_pad_src: torch.Tensor | None  # [Bp * T] int64: prefill-group row of each padded query (0 = pad)
    prefill_pad_valid: torch.Tensor | None  # [Np] int64: padded position of each prefill token
    prefill_q_pos: torch.Tensor | None  # [Bp, T] int64 position of each padded query
    max_q: int = 0  # T
    max_k: int = 0  # longest prefill sequence


class SdpaPagedAttention:
    """Gather + SDPA; fast enough on CPU for small models, and exact in float32."""

    def __init__(self) -> None:
        self._scratch: dict[str, torch.Tensor] = {}
        self._masks: tuple[StepMetadata, torch.Tensor | None, torch.Tensor | None] | None = None

    def _gather(self, name: str, cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """`cache[block_table]` as [B, Hkv, M * P, D], written into a reused buffer."""
        B, M = block_table.shape
        _, P, H, D = cache.shape
        n = B * M * P * H * D
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self._scratch[name] = torch.empty(n, dtype=cache.dtype, device=cache.device)
        out = buf[:n].view(B * M, P, H, D)
        torch.index_select(cache, 0, block_table.reshape(-1), out=out)
        return out.view(B, M * P, H, D).transpose(1, 2)

    def _step_masks(self, meta: StepMetadata, P: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Key masks of the step, built by the first layer and reused by the others."""
        if self._masks is not None and self._masks[0] is meta:
            return self._masks[1], self._masks[2]
        dec = pre = None
        if meta.num_decode:
            L = meta.decode_block_table.shape[1] * P
            keys = torch.arange(L, device=meta.slots.device)
            dec = (keys < meta.decode_seq_lens.unsqueeze(-1)).view(meta.num_decode, 1, 1, L)  # [Bd, 1, 1, L]
        if meta.prefill_block_table is not None:
            L = meta.prefill_block_table.shape[1] * P
            keys = torch.arange(L, device=meta.slots.device)
            pre = (keys <= meta.prefill_q_pos.unsqueeze(-1)).unsqueeze(1)  # [Bp, 1, T, L]
        self._masks = (meta, dec, pre)
        return dec, pre

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepMetadata,
                 scale: float) -> torch.Tensor:
        """q: [N, Hq, D] (K/V of the new tokens already written); returns [N, Hq, D]."""
        dec_mask, pre_mask = self._step_masks(meta, k_cache.shape[1])
        N, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        Bd = meta.num_decode
        parts = []
        if Bd:
            k = self._gather("k", k_cache, meta.decode_block_table)  # [Bd, Hkv, L, D]
            v = self._gather("v", v_cache, meta.decode_block_table)
            qg = q[:Bd].reshape(Bd, Hkv, Hq // Hkv, D)  # [Bd, Hkv, G, D]
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=dec_mask, scale=scale)
            parts.append(out.reshape(Bd, Hq, D))
        if N > Bd:
            Bp, T = meta.prefill_q_pos.shape
            k = self._gather("k", k_cache, meta.prefill_block_table)  # [Bp, Hkv, L, D]
            v = self._gather("v", v_cache, meta.prefill_block_table)
            qp = q[Bd:].index_select(0, meta.prefill_pad_src).view(Bp, T, Hq, D).transpose(1, 2)  # [Bp, Hq, T, D]
            out = F.scaled_dot_product_attention(qp, k, v, attn_mask=pre_mask, scale=scale, enable_gqa=Hq != Hkv)
            parts.append(out.transpose(1, 2).reshape(Bp * T, Hq, D).index_select(0, meta.prefill_pad_valid))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
        """Store the new tokens' keys/values ([N, Hkv, D]) at their slots of one layer's cache."""
        H, D = k_cache.shape[2:]
        k_cache.view(-1, H, D).index_copy_(0, slots, k)
        v_cache.view(-1, H, D).index_copy_(0, slots, v)


class KernelPagedAttention:
    """The Triton paged-attention kernels (CUDA)."""

    def __init__(self) -> None:
        from agentrl.rollout.backends.kernels import paged_decode_attention, paged_prefill_attention, write_kv

        self._decode, self._prefill, self.write = paged_decode_attention, paged_prefill_attention, write_kv

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepMetadata,
                 scale: float) -> torch.Tensor:
        Bd = meta.num_decode
        parts = []
        if Bd:
            parts.append(self._decode(q[:Bd], k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens, scale))
        if q.shape[0] > Bd:
            parts.append(self._prefill(q[Bd:], k_cache, v_cache, meta.prefill_block_table, meta.prefill_cu_q,
                                       meta.prefill_seq_lens, scale, meta.max_q, meta.max_k))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def make_attention(device: torch.device):
    """The kernels on CUDA when they import, else SDPA."""
    if device.type == "cuda":
        try:
            return KernelPagedAttention()
        except ImportError:
            pass
    return SdpaPagedAttention()
