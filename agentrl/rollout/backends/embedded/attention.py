"""Attention of one engine step over the paged KV cache, and the per-step metadata it needs.

A step's tokens are flat: first the decode group (one new token per sequence), then the prefill
group (a chunk of new tokens per sequence, whose earlier positions may come from the prefix
cache). `StepMetadata` holds what both groups need, built once per step and shared by all layers.

Two implementations of one interface:
- `SdpaPagedAttention` (CPU, and any device without the kernels): gathers each sequence's blocks
  with `index_select` into a reused scratch buffer. Prefill calls PyTorch SDPA with a causal
  length mask. Decode (with at most 4 KV heads) is two batched matmuls, one item per sequence,
  over block-diagonal queries: SDPA's per-call overhead made it 3x slower on these tiny shapes.
  With more KV heads decode calls SDPA with the G query heads of a KV head folded into the query
  axis (`[B, Hkv, G, D]`), which is GQA without repeating K/V.
- `KernelPagedAttention` (CUDA): the Triton kernels of `backends/kernels/paged_attention.py`.

Only the first implements a sliding window (keys older than the window are masked; their KV stays
in the cache, so prefix sharing is unaffected) and Gemma 2's soft-capped scores
(`cap * tanh(scores / cap)` before the mask, which SDPA cannot do: those layers compute the
scores explicitly, as HF's eager attention does). The model runner sends the layers that need
either to `SdpaPagedAttention` on every device.

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
        self._masks_of: StepMetadata | None = None  # the step whose masks `_masks` holds
        self._masks: dict[int | None, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def _buffer(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        """A reused flat scratch buffer of at least `n` elements (zeroed when first made)."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch[name] = torch.zeros(n, dtype=like.dtype, device=like.device)
        return buf

    def _gather(self, name: str, cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """`cache[block_table]` as [B, M * P, Hkv, D], written into a reused buffer."""
        B, M = block_table.shape
        _, P, H, D = cache.shape
        out = self._buffer(name, B * M * P * H * D, cache)[:B * M * P * H * D].view(B * M, P, H, D)
        torch.index_select(cache, 0, block_table.reshape(-1), out=out)
        return out.view(B, M * P, H, D)

    def _step_masks(self, meta: StepMetadata, k_cache: torch.Tensor,
                    window: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Key masks of the step for one window size, built by the first layer and reused by the others.

        Decode: additive (0 / -inf) `[Bd, 1, L]` for the matmul path, boolean `[Bd, 1, 1, L]` for SDPA.
        Prefill: boolean `[Bp, 1, T, L]`. With a window, a query at position q keeps keys k with
        q - window < k <= q (HF's sliding-window mask).
        """
        if self._masks_of is not meta:
            self._masks_of, self._masks = meta, {}
        if window in self._masks:
            return self._masks[window]
        P = k_cache.shape[1]
        dec = pre = None
        if meta.num_decode:
            L = meta.decode_block_table.shape[1] * P
            keys = torch.arange(L, device=meta.slots.device)
            lens = meta.decode_seq_lens.unsqueeze(-1)  # [Bd, 1]: the query sits at position len - 1
            hidden = keys >= lens  # [Bd, L]
            if window is not None:
                hidden |= keys < lens - window
            if self._decode_by_matmul(k_cache):
                dec = torch.zeros(hidden.shape, dtype=k_cache.dtype, device=hidden.device)
                dec = dec.masked_fill_(hidden, -torch.inf).unsqueeze(1)  # [Bd, 1, L]
            else:
                dec = (~hidden).view(meta.num_decode, 1, 1, L)  # [Bd, 1, 1, L]
        if meta.prefill_block_table is not None:
            L = meta.prefill_block_table.shape[1] * P
            keys = torch.arange(L, device=meta.slots.device)
            q_pos = meta.prefill_q_pos.unsqueeze(-1)  # [Bp, T, 1]
            keep = keys <= q_pos
            if window is not None:
                keep &= keys > q_pos - window
            pre = keep.unsqueeze(1)  # [Bp, 1, T, L]
        self._masks[window] = (dec, pre)
        return dec, pre

    @staticmethod
    def _decode_by_matmul(k_cache: torch.Tensor) -> bool:
        """Decode attention as two batched matmuls over block-diagonal queries (see `_decode`).

        It computes Hkv times the scores it needs, so it pays only with few KV heads; there it is
        several times faster than SDPA, whose per-call overhead dominates these tiny shapes.
        """
        return k_cache.shape[2] <= 4

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepMetadata,
                mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
        """Decode attention, q: [Bd, Hq, D] -> [Bd, Hq, D].

        Each sequence is one `bmm` item: its gathered keys `[L, Hkv * D]` are used as they lie, and
        each query head is spread over `Hkv * D` columns that are zero outside its own KV head, so
        `q_e @ k.T` is the [Hq, L] score matrix of GQA without repeating K/V or copying them
        head-major. `p @ v` then gives every head's output for every KV head; the diagonal blocks
        are the real ones.
        """
        Bd, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        G = Hq // Hkv
        k = self._gather("k", k_cache, meta.decode_block_table).flatten(2)  # [Bd, L, Hkv D]
        v = self._gather("v", v_cache, meta.decode_block_table).flatten(2)
        if not self._decode_by_matmul(k_cache):
            qg = q.reshape(Bd, Hkv, G, D)  # [Bd, Hkv, G, D]
            kh, vh = (t.view(Bd, -1, Hkv, D).transpose(1, 2) for t in (k, v))  # [Bd, Hkv, L, D]
            return _attend(qg, kh, vh, mask, scale, softcap).reshape(Bd, Hq, D)
        # Only the diagonal blocks are ever written, so the rest of the buffer stays zero.
        q_e = self._buffer("q_e", Bd * Hq * Hkv * D, q)[:Bd * Hq * Hkv * D].view(Bd, Hq, Hkv * D)
        q_e.view(Bd, Hkv, G, Hkv, D).diagonal(0, 1, 3).copy_(q.reshape(Bd, Hkv, G, D).permute(0, 2, 3, 1))
        if softcap is None:
            scores = torch.baddbmm(mask, q_e, k.transpose(1, 2), alpha=scale)  # [Bd, Hq, L]
        else:  # HF's order: scale, cap, then the mask
            scores = _softcap(torch.bmm(q_e, k.transpose(1, 2)) * scale, softcap) + mask
        out = torch.bmm(torch.softmax(scores, -1), v)  # [Bd, Hq, Hkv D]
        out = out.view(Bd, Hkv, G, Hkv, D).diagonal(0, 1, 3)  # [Bd, G, D, Hkv]
        return out.permute(0, 3, 1, 2).reshape(Bd, Hq, D)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepMetadata,
                 scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q: [N, Hq, D] (K/V of the new tokens already written); returns [N, Hq, D].

        `window`: sliding-window size of this layer (None: full causal); `softcap`: Gemma 2's score cap.
        """
        dec_mask, pre_mask = self._step_masks(meta, k_cache, window)
        N, Hq, D = q.shape
        Bd = meta.num_decode
        parts = []
        if Bd:
            parts.append(self._decode(q[:Bd], k_cache, v_cache, meta, dec_mask, scale, softcap))
        if N > Bd:
            Bp, T = meta.prefill_q_pos.shape
            k = self._gather("k", k_cache, meta.prefill_block_table).transpose(1, 2)  # [Bp, Hkv, L, D]
            v = self._gather("v", v_cache, meta.prefill_block_table).transpose(1, 2)
            qp = q[Bd:].index_select(0, meta.prefill_pad_src).view(Bp, T, Hq, D).transpose(1, 2)  # [Bp, Hq, T, D]
            out = _attend(qp, k, v, pre_mask, scale, softcap)
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
    """The Triton paged-attention kernels (CUDA): full causal attention, no window, no soft-cap.

    The new tokens' K/V are usually written by the model runner's fused rotary kernel
    (`kernels/rotary.py`); `write` serves the layers whose rotary runs in torch (q/k norms,
    partial rotary, no rotary).
    """

    def __init__(self) -> None:
        from agentrl.rollout.backends.embedded.kernels import paged_decode_attention, paged_prefill_attention, write_kv

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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
            softcap: float | None) -> torch.Tensor:
    """Attention of q [B, h, T, D] over k, v [B, Hkv, L, D] (h a multiple of Hkv) where `keep` [B, 1, T, L].

    SDPA when the scores are not capped; else the scores explicitly, in HF's eager order (scale,
    cap, mask, softmax in float32, rounded to the model dtype).
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [B, h, L, D]
    scores = _softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap).masked_fill(~keep, -torch.inf)
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)


def _softcap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(scores / cap) * cap


def make_attention(device: torch.device):
    """The kernels on CUDA when they import, else SDPA."""
    if device.type == "cuda":
        try:
            return KernelPagedAttention()
        except ImportError:
            pass
    return SdpaPagedAttention()
