"""Finding each family's weights inside the Hugging Face model, fused where the engine wants one matrix.

The weights stay owned by the HF model, so `load_state_dict` with the trainer's names keeps
working. Separate q/k/v and gate/up projections are concatenated into one matrix each (one matmul
instead of three or two) and the model's own parameters are re-pointed at slices of it, so a
weight update writes straight into the fused matrices and no weight is stored twice. Phi-3 stores
them fused already; Qwen3-MoE stores its experts as 3-D tensors, used as they are. Nothing is
derived from a weight and kept (Gemma's `1 + w` is computed where it is used), so an in-place
update can leave nothing stale behind.

Every parameter of the model must be read by the family's binding: one that is not (a bias, a
norm or a projection some variant adds) is refused, since running without it would be wrong.

Letters: H hidden size, Hq / Hkv query / KV heads, D head dim, I MLP width, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.architectures import USE_INSTEAD, ArchSpec

# Names of the norms in an HF layer, by the engine's role for them, for each layout.
_NORMS = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "sandwich": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                 "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
}


@dataclass
class LayerWeights:
    """One decoder layer's tensors (views of the HF model's parameters); None where the family has none."""

    qkv_w: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # [H, Hq D]
    o_b: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # [D] per head, or [Hq D] over the projection
    k_norm: torch.Tensor | None = None  # [D] or [Hkv D]
    attn_in: torch.Tensor | None = None  # [H] norms around attention and MLP (see ArchSpec.layout)
    attn_out: torch.Tensor | None = None
    mlp_in: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    gate_up_w: torch.Tensor | None = None  # [2 I, H] dense MLP, gate rows first
    gate_up_b: torch.Tensor | None = None
    down_w: torch.Tensor | None = None  # [H, I]
    down_b: torch.Tensor | None = None
    router_w: torch.Tensor | None = None  # [E, H] MoE
    experts_gate_up: torch.Tensor | None = None  # [E, 2 I, H]
    experts_down: torch.Tensor | None = None  # [E, H, I]


@dataclass
class ModelWeights:
    layers: list[LayerWeights]
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)


def fuse(linears: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
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


class _Reader:
    """Reads parameters by attribute path and remembers which ones it read."""

    def __init__(self) -> None:
        self.read: set[int] = set()

    def get(self, module: torch.nn.Module, path: str, required: bool = True) -> torch.Tensor | None:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                if required:
                    raise EngineError(f"expected a `{path}` in {type(module).__name__}: the model does not have "
                                      "its family's layout in transformers 5 (an older transformers, or a "
                                      f"variant). {USE_INSTEAD}")
                return None
        self.read.add(id(obj))
        return obj

    def linears(self, modules: list[torch.nn.Module]) -> None:
        for m in modules:
            self.get(m, "weight")
            self.get(m, "bias", required=False)


def bind_weights(model: torch.nn.Module, spec: ArchSpec) -> ModelWeights:
    """The tensors of `model` the forward pass reads, laid out for `spec` (fusing where needed).

    Call again after the model moved (`.to()` replaces parameter storage and breaks the views).
    """
    inner = model.model
    reader = _Reader()
    layers = [_bind_layer(blk, i, spec, reader) for i, blk in enumerate(inner.layers)]
    if len(layers) != len(spec.layers):
        raise EngineError(f"the model has {len(layers)} layers but its config says {len(spec.layers)}")
    weights = ModelWeights(layers=layers, embed=reader.get(inner, "embed_tokens.weight"),
                           final_norm=reader.get(inner, "norm.weight"),
                           lm_head=reader.get(model.get_output_embeddings(), "weight"))
    unread = [name for name, p in model.named_parameters() if id(p) not in reader.read]
    if unread:
        more = " ..." if len(unread) > 6 else ""
        raise EngineError(f"the built-in engine's {spec.family} adapter does not implement the parameters "
                          f"{unread[:6]}{more} (a variant it does not know); {USE_INSTEAD}")
    return weights


def _bind_layer(blk: torch.nn.Module, i: int, spec: ArchSpec, reader: _Reader) -> LayerWeights:
    at, mlp, layer = blk.self_attn, blk.mlp, spec.layers[i]
    hf_window = getattr(at, "sliding_window", layer.window)  # Mistral and Phi-3 read the config in the call
    if hf_window != layer.window:
        raise EngineError(f"layer {i}: the config's sliding-window settings disagree (HF's attention module has "
                          f"{hf_window}, its mask {layer.window}), so HF's attention backends would differ. "
                          f"{USE_INSTEAD}")
    if hasattr(mlp, "experts") != layer.moe:
        raise EngineError(f"layer {i}: expected {'an MoE' if layer.moe else 'a dense'} MLP from the config, "
                          f"found {type(mlp).__name__}. {USE_INSTEAD}")
    if spec.fused_projections:
        reader.linears([at.qkv_proj, at.o_proj])
        qkv_w, qkv_b = at.qkv_proj.weight, at.qkv_proj.bias
    else:
        projections = [at.q_proj, at.k_proj, at.v_proj]
        reader.linears(projections + [at.o_proj])
        qkv_w, qkv_b = fuse(projections, "weight"), fuse(projections, "bias")
    expected = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    if qkv_w.shape[0] != expected:
        raise EngineError(f"layer {i}: q/k/v projections have {qkv_w.shape[0]} rows, expected {expected} "
                          f"from the config's heads and head_dim")
    norms = {role: reader.get(blk, f"{name}.weight") for role, name in _NORMS[spec.layout].items()}
    lw = LayerWeights(qkv_w=qkv_w, qkv_b=qkv_b, o_w=at.o_proj.weight, o_b=at.o_proj.bias, **norms)
    if spec.qk_norm:
        lw.q_norm, lw.k_norm = reader.get(at, "q_norm.weight"), reader.get(at, "k_norm.weight")
    if layer.moe:
        lw.router_w = reader.get(mlp, "gate.weight")
        lw.experts_gate_up = reader.get(mlp, "experts.gate_up_proj")
        lw.experts_down = reader.get(mlp, "experts.down_proj")
    elif spec.fused_projections:
        reader.linears([mlp.gate_up_proj, mlp.down_proj])
        lw.gate_up_w, lw.gate_up_b = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    else:
        reader.linears([mlp.gate_proj, mlp.up_proj, mlp.down_proj])
        lw.gate_up_w = fuse([mlp.gate_proj, mlp.up_proj], "weight")
        lw.gate_up_b = fuse([mlp.gate_proj, mlp.up_proj], "bias")
    if not layer.moe:
        lw.down_w, lw.down_b = mlp.down_proj.weight, mlp.down_proj.bias
    return lw


def check_architecture(config, max_model_len: int | None = None) -> ArchSpec:
    """Everything the engine checks at load, from a config alone: the table, the options, the weights'
    names. The model is built on the meta device, so no weight is read or allocated.

    Raises `EngineError` naming what is not supported (what `agentrl check-model` reports).
    """
    from transformers import AutoModelForCausalLM

    from agentrl.rollout.backends.embedded.architectures import check_model_type, resolve_architecture

    check_model_type(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    length = max_model_len or getattr(config, "max_position_embeddings", None) or 4096
    spec = resolve_architecture(model, length)
    bind_weights(model, spec)
    return spec
