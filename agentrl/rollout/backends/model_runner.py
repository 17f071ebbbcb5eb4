"""The forward pass of the built-in engine over Hugging Face Qwen2 / Llama-family weights.

One call computes a whole step: a flat batch of new tokens (decode tokens and prefill chunks of
many sequences, no padding) at their positions, writing their K/V into the paged cache and
attending over it, and returns the logits of only the positions that will be sampled.

The weights stay owned by the Hugging Face model, so `load_state_dict` with the trainer's names
keeps working. At bind time q/k/v and gate/up are concatenated into one matrix each (one matmul
instead of three or two) and the model's own parameters are re-pointed at slices of it, so a
weight update writes straight into the fused matrices and no weight is stored twice.

Letters: N new tokens in the step, S sampled rows, H hidden size, Hq / Hkv query / KV heads,
D head dim, I MLP width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agentrl.errors import EngineError
from agentrl.rollout.backends.attention import KernelPagedAttention, StepMetadata, make_attention
from agentrl.rollout.backends.kernels.fused_ops import add_rms_norm, silu_and_mul
from agentrl.rollout.backends.kernels.rotary import rope_write_kv
from agentrl.rollout.backends.kv_cache import PagedKVCache


_SPLIT_GATED_ROWS = 512  # see ModelRunner._gated


@dataclass
class StepInputs:
    """Token-level tensors of one step (see `step_inputs.build_step_inputs`)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    logits_index: torch.Tensor | None  # [S] int64: row of each sampled sequence's last token; None: every row
    meta: StepMetadata


@dataclass
class _Layer:
    qkv_w: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # [H, Hq D]
    o_b: torch.Tensor | None
    ln1: torch.Tensor  # [H]
    ln2: torch.Tensor  # [H]
    gate_up_w: torch.Tensor  # [2 I, H]
    down_w: torch.Tensor  # [H, I]


def _fuse(linears: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
    """Concatenate `linears`' weights (or biases) along dim 0 and make each one a view of the result."""
    parts = [getattr(m, name) for m in linears]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise EngineError(f"some of {len(parts)} projections have a {name} and some do not; unsupported model")
    fused = torch.cat([p.data for p in parts])
    start = 0
    for p in parts:
        p.data = fused[start:start + p.shape[0]]
        start += p.shape[0]
    return fused


class ModelRunner:
    """Runs steps of a decoder-only HF model (Qwen2, Llama, Mistral-style blocks) on a paged KV cache.

    Args:
        model: A loaded `*ForCausalLM` whose blocks have `self_attn.{q,k,v,o}_proj`,
            `mlp.{gate,up,down}_proj` and RMSNorms; already on its device and dtype.
        max_model_len: Longest sequence (size of the rotary table).
    """

    def __init__(self, model: torch.nn.Module, max_model_len: int):
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise EngineError("sliding-window attention is not supported by the built-in engine")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner.layers[0], "self_attn"):
            raise EngineError(f"{type(model).__name__} is not a Qwen2/Llama-style decoder; the built-in engine runs "
                              "models with model.layers[i].self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj")
        self.model = model
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.num_layers = cfg.num_hidden_layers
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.max_model_len = max_model_len
        self.bind()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def bind(self) -> None:
        """(Re)build the fused views, the rotary table and the attention backend from the model.

        Call again after the model moved (`.to()` replaces parameter storage and breaks the views).
        """
        inner = self.model.model
        self.layers = []
        for blk in inner.layers:
            at, mlp = blk.self_attn, blk.mlp
            self.layers.append(_Layer(
                qkv_w=_fuse([at.q_proj, at.k_proj, at.v_proj], "weight"),
                qkv_b=_fuse([at.q_proj, at.k_proj, at.v_proj], "bias"),
                o_w=at.o_proj.weight, o_b=at.o_proj.bias,
                ln1=blk.input_layernorm.weight, ln2=blk.post_attention_layernorm.weight,
                gate_up_w=_fuse([mlp.gate_proj, mlp.up_proj], "weight"), down_w=mlp.down_proj.weight,
            ))
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = self.model.get_output_embeddings().weight
        self.qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        self.inter = self.layers[0].down_w.shape[1]
        pos = torch.arange(self.max_model_len, device=self.device).unsqueeze(0)
        probe = torch.zeros((), device=self.device, dtype=self.dtype)
        cos, sin = inner.rotary_emb(probe, pos)  # [1, P, D] each, in the model dtype, HF's own rope variant
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()  # [P, D]
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one roll instead of slice+neg+cat.
        self.sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).contiguous()  # [P, D]
        self.attention = make_attention(self.device)

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim,
                            self.dtype, self.device)

    @torch.no_grad()
    def forward(self, inp: StepInputs, cache: PagedKVCache, out: torch.Tensor | None = None) -> torch.Tensor:
        """Compute one step; returns logits [S, V] of the rows in `inp.logits_index` (all N rows if None).

        `out`, when given, receives the logits (a CUDA graph's static output buffer). Nothing here
        reads a device value on the host, so the whole pass can be captured in a CUDA graph.
        """
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(inp.input_ids, self.embed)  # [N, H]
        N = x.shape[0]
        fused_rope = isinstance(self.attention, KernelPagedAttention)  # rotary + cache write: one kernel
        if not fused_rope:
            cos = self.cos.index_select(0, inp.positions).unsqueeze(1)  # [N, 1, D], gathered once for all layers
            sin = self.sin_signed.index_select(0, inp.positions).unsqueeze(1)
        last = len(self.layers) - 1
        x, h = add_rms_norm(x, None, self.layers[0].ln1, self.eps)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)  # [N, (Hq + 2 Hkv) D]
            if fused_rope:
                q = rope_write_kv(qkv, self.cos, self.sin_signed, inp.positions, cache.k[i], cache.v[i],
                                  inp.meta.slots, Hq, Hkv)
            else:
                qk = qkv[:, : self.qk_width].view(N, Hq + Hkv, D)
                qk = qk * cos + qk.roll(D // 2, -1) * sin  # rotary on q and k at once
                q, k = qk[:, :Hq], qk[:, Hq:]
                v = qkv[:, self.qk_width:].view(N, Hkv, D)
                self.attention.write(cache.k[i], cache.v[i], k, v, inp.meta.slots)
            attn = self.attention(q, cache.k[i], cache.v[i], inp.meta, self.scale)  # [N, Hq, D]
            delta = F.linear(attn.reshape(N, Hq * D), lw.o_w, lw.o_b)  # [N, H]
            if i == last and inp.logits_index is not None:  # the MLP and the head only matter for sampled rows
                x, delta = x.index_select(0, inp.logits_index), delta.index_select(0, inp.logits_index)  # [S, H]
            x, h = add_rms_norm(x, delta, lw.ln2, self.eps)
            delta = F.linear(self._gated(h, lw.gate_up_w), lw.down_w)  # [*, H]
            x, h = add_rms_norm(x, delta, self.layers[i + 1].ln1 if i < last else self.final_norm, self.eps)
        if out is None:
            return F.linear(h, self.lm_head)  # [S, V]
        return torch.mm(h, self.lm_head.t(), out=out)

    def _gated(self, h: torch.Tensor, gate_up_w: torch.Tensor) -> torch.Tensor:
        """`silu(h @ gate.T) * (h @ up.T)`, [*, H] -> [*, I].

        On CUDA one matmul and the fused Triton kernel. On CPU, for prefill-sized steps, two
        matmuls into separate contiguous outputs and in-place SiLU and product: CPU elementwise
        kernels are ~2x slower on the strided halves of one [*, 2I] output (4.1 vs 2.4 ms per layer
        on a 4096-token prefill of the tiny model; the whole step 4-14% faster). Below
        `_SPLIT_GATED_ROWS` rows the second matmul call costs more than it saves (decode steps of
        16-64 rows were 2-8% slower split).
        """
        if h.is_cuda or h.shape[0] < _SPLIT_GATED_ROWS:
            return silu_and_mul(F.linear(h, gate_up_w))
        gate = F.linear(h, gate_up_w[:self.inter])  # [*, I]
        return F.silu(gate, inplace=True).mul_(F.linear(h, gate_up_w[self.inter:]))
