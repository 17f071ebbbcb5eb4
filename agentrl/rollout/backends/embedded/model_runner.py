"""The forward pass of the built-in engine over Hugging Face weights of the families in the table.

One call computes a whole step: a flat batch of new tokens (decode tokens and prefill chunks of
many sequences, no padding) at their positions, writing their K/V into the paged cache and
attending over it, and returns the logits of only the positions that will be sampled.

What a layer computes is read from the model's `ArchSpec` (`architectures.py`: the table of
supported families, everything else refused at load); the weights are the HF model's own
parameters (`model_weights.py`), so `load_state_dict` with the trainer's names updates them in place.

Fast path and fallbacks. On CUDA a layer uses the fused Triton kernels for what they implement:
residual add + RMSNorm for Llama-style norms, SiLU-and-mul, rotary + KV write for a full-width
rotary without q/k norms, and paged attention for full causal attention. A layer with a sliding
window or soft-capped scores attends with the torch path (`SdpaPagedAttention`), and Gemma-style
norms, q/k norms, partial or absent rotary, other activations and MoE routing run as plain torch
ops (`layer_ops.py`): correct first, and those families are slower on a GPU for now. CUDA graphs
need every layer on the kernels and no MoE (`graph_safe`); otherwise decode steps run eagerly.

Letters: N new tokens in the step, S sampled rows, H hidden size, Hq / Hkv query / KV heads,
D head dim, R rotary dims, P longest sequence, I MLP width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded import layer_ops
from agentrl.rollout.backends.embedded.architectures import USE_INSTEAD, resolve_architecture
from agentrl.rollout.backends.embedded.attention import KernelPagedAttention, SdpaPagedAttention, StepMetadata, make_attention
from agentrl.rollout.backends.embedded.kernels.rotary import rope_write_kv
from agentrl.rollout.backends.embedded.kv_cache import PagedKVCache
from agentrl.rollout.backends.embedded.model_weights import LayerWeights, bind_weights

_SPLIT_GATED_ROWS = 512  # see ModelRunner._gated


@dataclass
class StepInputs:
    """Token-level tensors of one step (see `step_inputs.build_step_inputs`)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    logits_index: torch.Tensor | None  # [S] int64: row of each sampled sequence's last token; None: every row
    meta: StepMetadata


@dataclass(frozen=True)
class _LayerPlan:
    """How one layer runs on this device: which rotary, which attention backend, with what options."""

    rope: str | None  # rotary table name (None: no rotary)
    fused_rope: bool  # rotary + K/V write in one kernel
    attention: object  # KernelPagedAttention or SdpaPagedAttention
    attn_options: dict = field(default_factory=dict)  # window / softcap for the torch attention


class ModelRunner:
    """Runs steps of a decoder-only HF model of a supported family on a paged KV cache.

    Args:
        model: A loaded `*ForCausalLM` of a family in `architectures.ADAPTERS`, already on its
            device and dtype. Anything else raises `EngineError` naming what is unsupported.
        max_model_len: Longest sequence (size of the rotary tables).
    """

    def __init__(self, model: torch.nn.Module, max_model_len: int):
        self.spec = resolve_architecture(model, max_model_len)
        self.model = model
        self.num_heads, self.num_kv_heads = self.spec.num_heads, self.spec.num_kv_heads
        self.head_dim = self.spec.head_dim
        self.num_layers = len(self.spec.layers)
        self.eps = self.spec.eps
        self.scale = self.spec.scale
        self.max_model_len = max_model_len
        self.bind()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def graph_safe(self) -> bool:
        """True if a decode step can be captured in a CUDA graph (every layer on the kernels, no MoE)."""
        return all(isinstance(p.attention, KernelPagedAttention) for p in self._plans) and \
            not any(layer.moe for layer in self.spec.layers)

    def bind(self) -> None:
        """(Re)build the weight views, the rotary tables and the attention backends from the model.

        Call again after the model moved (`.to()` replaces parameter storage and breaks the views).
        """
        w = bind_weights(self.model, self.spec)
        self.layers: list[LayerWeights] = w.layers
        self.embed, self.final_norm, self.lm_head = w.embed, w.final_norm, w.lm_head
        self.qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        self.ropes = self._rotary_tables()
        self.attention = make_attention(self.device)
        torch_attention = self.attention if isinstance(self.attention, SdpaPagedAttention) else SdpaPagedAttention()
        self._plans = [self._plan(layer, torch_attention) for layer in self.spec.layers]
        s = self.spec
        self._embed_scale = None if s.embed_scale is None else \
            torch.tensor(s.embed_scale).to(self.device, self.dtype) if s.embed_scale_in_dtype else s.embed_scale

    def _rotary_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos [P, R], sin_signed [P, R]) of each rotary table, from HF's own rotary module.

        HF's module implements every static rope type (default, linear, llama3, yarn, longrope
        below its switch length); its output dtype is kept (OLMo 2's is float32, the others the
        model's). rotate_half(x) * sin == roll(x, R/2) * [-sin_lo, sin_hi]: one roll instead of slice+neg+cat.
        """
        pos = torch.arange(self.max_model_len, device=self.device).unsqueeze(0)
        probe = torch.zeros((), device=self.device, dtype=self.dtype)
        tables = {}
        for name in sorted({layer.rope for layer in self.spec.layers if layer.rope is not None}):
            rotary = self.model.model.rotary_emb
            cos, sin = rotary(probe, pos, name) if self.spec.rope_by_layer_type else rotary(probe, pos)  # [1, P, R]
            R = cos.shape[-1]
            if R != self.head_dim and not self.spec.partial_rotary:
                raise EngineError(f"the rotary table covers {R} of {self.head_dim} head dims, which "
                                  f"{self.spec.family}'s HF code does not implement; {USE_INSTEAD}")
            tables[name] = (cos[0].contiguous(), torch.cat([-sin[0, :, :R // 2], sin[0, :, R // 2:]], -1).contiguous())
        return tables

    def _plan(self, layer, torch_attention: SdpaPagedAttention) -> _LayerPlan:
        window = layer.window if layer.window is not None and layer.window < self.max_model_len else None
        softcap = self.spec.attn_softcap
        on_kernels = isinstance(self.attention, KernelPagedAttention)
        fused_rope = on_kernels and layer.rope is not None and not self.spec.qk_norm and \
            self.ropes[layer.rope][0].shape == (self.max_model_len, self.head_dim) and \
            self.ropes[layer.rope][0].dtype == self.dtype
        if window is None and softcap is None:
            return _LayerPlan(layer.rope, fused_rope, self.attention)
        return _LayerPlan(layer.rope, fused_rope, torch_attention, dict(window=window, softcap=softcap))

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim,
                            self.dtype, self.device)

    @torch.no_grad()
    def forward(self, inp: StepInputs, cache: PagedKVCache, out: torch.Tensor | None = None) -> torch.Tensor:
        """Compute one step; returns logits [S, V] of the rows in `inp.logits_index` (all N rows if None).

        `out`, when given, receives the logits (a CUDA graph's static output buffer). On the
        graph-safe path nothing here reads a device value on the host.
        """
        s = self.spec
        x = F.embedding(inp.input_ids, self.embed)  # [N, H]
        if self._embed_scale is not None:
            x = x * self._embed_scale
        ropes = {name: tuple(t.index_select(0, inp.positions).unsqueeze(1) for t in table)  # [N, 1, R] each
                 for name, table in self.ropes.items()
                 if any(p.rope == name and not p.fused_rope for p in self._plans)}
        last = len(self.layers) - 1
        x, h = layer_ops.add_norm(x, None, self.layers[0].attn_in, self.eps, s.norm)
        for i, lw in enumerate(self.layers):
            delta = self._attention(i, lw, h, inp, cache, ropes)  # [N, H]
            if lw.attn_out is not None:
                delta = layer_ops.rms_norm(delta, lw.attn_out, self.eps, s.norm)
            if i == last and inp.logits_index is not None:  # the MLP and the head only matter for sampled rows
                x, delta = x.index_select(0, inp.logits_index), delta.index_select(0, inp.logits_index)  # [S, H]
            x, h = layer_ops.add_norm(x, self._residual(delta), lw.mlp_in, self.eps, s.norm)
            delta = self._mlp(i, lw, h)  # [*, H]
            if lw.mlp_out is not None:
                delta = layer_ops.rms_norm(delta, lw.mlp_out, self.eps, s.norm)
            nxt = self.layers[i + 1].attn_in if i < last else self.final_norm
            x, h = layer_ops.add_norm(x, self._residual(delta), nxt, self.eps, s.norm)
        return self._logits(h, out)

    def _attention(self, i: int, lw: LayerWeights, h: torch.Tensor, inp: StepInputs, cache: PagedKVCache,
                   ropes: dict) -> torch.Tensor:
        """Self-attention of layer i: h [N, H] -> [N, H], writing the new tokens' K/V into the cache."""
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        plan = self._plans[i]
        qkv = F.linear(h, lw.qkv_w, lw.qkv_b)  # [N, (Hq + 2 Hkv) D]
        N = qkv.shape[0]
        if plan.fused_rope:
            cos, sin = self.ropes[plan.rope]
            q = rope_write_kv(qkv, cos, sin, inp.positions, cache.k[i], cache.v[i], inp.meta.slots, Hq, Hkv)
        else:
            q, k = self._rotated_qk(lw, qkv, ropes.get(plan.rope))
            plan.attention.write(cache.k[i], cache.v[i], k, qkv[:, self.qk_width:].view(N, Hkv, D), inp.meta.slots)
        attn = plan.attention(q, cache.k[i], cache.v[i], inp.meta, self.scale, **plan.attn_options)  # [N, Hq, D]
        return F.linear(attn.reshape(N, Hq * D), lw.o_w, lw.o_b)

    def _rotated_qk(self, lw: LayerWeights, qkv: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, Hq, D] and k [N, Hkv, D] of `qkv`, q/k-normed and rotated as the family does."""
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        N, qw = qkv.shape[0], Hq * D
        kind = self.spec.qk_norm
        if kind is None:  # q and k in one tensor: one rotary op for both
            qk = qkv[:, :self.qk_width].view(N, Hq + Hkv, D)
            qk = qk if rope is None else layer_ops.apply_rotary(qk, *rope)
            return qk[:, :Hq], qk[:, Hq:]
        q, k = qkv[:, :qw], qkv[:, qw:self.qk_width]
        if kind == "projection":  # OLMo 2: over the whole projection, before splitting into heads
            q, k = (layer_ops.rms_norm(t, w, self.eps, self.spec.norm) for t, w in ((q, lw.q_norm), (k, lw.k_norm)))
        q, k = q.reshape(N, Hq, D), k.reshape(N, Hkv, D)
        if kind == "head":
            q, k = (layer_ops.rms_norm(t, w, self.eps, self.spec.norm) for t, w in ((q, lw.q_norm), (k, lw.k_norm)))
        if rope is not None:
            q, k = layer_ops.apply_rotary(q, *rope), layer_ops.apply_rotary(k, *rope)
        return q, k

    def _residual(self, delta: torch.Tensor) -> torch.Tensor:
        """A sub-layer's output as added to the residual stream (Granite scales it)."""
        return delta if self.spec.residual_scale is None else delta * self.spec.residual_scale

    def _mlp(self, i: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        if self.spec.layers[i].moe:
            return layer_ops.moe(h, lw.router_w, lw.experts_gate_up, lw.experts_down, self.spec)
        return F.linear(self._gated(h, lw), lw.down_w, lw.down_b)

    def _gated(self, h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """`act(h @ gate.T) * (h @ up.T)`, [*, H] -> [*, I].

        On CUDA one matmul and (for SiLU) the fused Triton kernel. On CPU, for prefill-sized
        steps, two matmuls into separate contiguous outputs and in-place activation and product:
        CPU elementwise kernels are ~2x slower on the strided halves of one [*, 2I] output (4.1 vs
        2.4 ms per layer on a 4096-token prefill of the tiny model; the whole step 4-14% faster).
        Below `_SPLIT_GATED_ROWS` rows the second matmul call costs more than it saves (decode
        steps of 16-64 rows were 2-8% slower split).
        """
        act, w, b = self.spec.activation, lw.gate_up_w, lw.gate_up_b
        if h.is_cuda or h.shape[0] < _SPLIT_GATED_ROWS:
            return layer_ops.gated(F.linear(h, w, b), act)
        inter = w.shape[0] // 2
        gate = F.linear(h, w[:inter], None if b is None else b[:inter])  # [*, I]
        up = F.linear(h, w[inter:], None if b is None else b[inter:])
        if act == "silu":
            return F.silu(gate, inplace=True).mul_(up)
        return layer_ops.activation(act)(gate).mul_(up)

    def _logits(self, h: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """[S, H] -> [S, V]: the head, then Granite's divisor and Gemma's final soft-cap, as HF applies them."""
        s = self.spec
        if s.logits_divisor is None and s.final_softcap is None:
            return F.linear(h, self.lm_head) if out is None else torch.mm(h, self.lm_head.t(), out=out)
        logits = F.linear(h, self.lm_head)
        if s.logits_divisor is not None:
            logits = logits / s.logits_divisor
        if s.final_softcap is not None:
            logits = layer_ops.softcap(logits, s.final_softcap)
        return logits if out is None else out.copy_(logits)
