"""The built-in engine's table of supported model architectures, one small adapter per family.

The engine computes a decoder layer from an `ArchSpec`: a frozen list of the features in which
the families differ (how RMSNorm rounds and whether it scales by `1 + w`, where the norms sit,
q/k norms, the activation, scaling multipliers, logit soft-capping, per-layer sliding window,
rotary table or none, MoE routing). Each family in `ADAPTERS` reads its Hugging Face config into
that spec; the facts come from reading `transformers`' modeling code for the family (checked on
transformers 5.17 and 5.24).

What the table does not list is refused at load with an `EngineError` that names it: another
architecture, a config option the engine does not implement (an activation, a rope type whose
table depends on the sequence length, bidirectional attention, quantised weights, ...). A model
that ran with a feature silently ignored would sample from the wrong distribution, which in RL is
worse than not running at all. `model_weights.py` adds the last check: every parameter of the
model must be one the adapter reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from agentrl.errors import EngineError

USE_INSTEAD = "use `rollout.engine: sglang` or `rollout.engine: vllm` for this model"

# The activations the engine implements, by the names HF configs use (each as HF computes it).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# Rope types whose cos/sin table is fixed once the config is: the engine takes HF's own table.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does beyond the family's common block."""

    window: int | None = None  # sliding window: a query at position q sees keys k with q - k < window
    rope: str | None = "default"  # name of its rotary table; None: no rotary (a NoPE layer)
    moe: bool = False  # a routed mixture of experts instead of the dense MLP


@dataclass(frozen=True)
class MoeSpec:
    """Top-k softmax routing (Qwen3-MoE): softmax over experts in float32, keep the k largest."""

    top_k: int
    norm_topk_prob: bool  # renormalise the kept k probabilities to sum to 1


@dataclass(frozen=True)
class ArchSpec:
    """The features of one model's architecture that the forward pass reads.

    norm: how RMSNorm rounds in half precision: `"round_then_scale"` (Llama: normalise in float32,
        round, multiply by w), `"scale_then_round"` (OLMo 2: multiply by w in float32, round) or
        `"offset"` (Gemma: multiply by `1 + w` in float32, round). Identical in float32 but for the offset.
    layout: `"pre"` (norm before attention and MLP), `"sandwich"` (Gemma 2/3: also a norm on each
        sub-layer's output before the residual add) or `"post"` (OLMo 2: only the output norms).
    qk_norm: None, `"head"` (RMSNorm of each head of q and k, Qwen3 / Gemma 3) or `"projection"`
        (RMSNorm over the whole q and k projections, OLMo 2); applied before rotary.
    """

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    norm: str = "round_then_scale"
    layout: str = "pre"
    qk_norm: str | None = None
    activation: str = "silu"
    attn_scale: float | None = None  # softmax scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2 / 3)
    embed_scale: float | None = None  # embeddings are multiplied by this (Granite)
    embed_scale_in_dtype: bool = False  # ... after rounding it to the model dtype (Gemma: sqrt(hidden))
    residual_scale: float | None = None  # each sub-layer's output is multiplied by this before the add (Granite)
    logits_divisor: float | None = None  # logits are divided by this (Granite's logits_scaling)
    partial_rotary: bool = False  # HF's code rotates only the first dims the rotary table covers (Phi-3)
    rope_by_layer_type: bool = False  # HF's rotary module takes the layer type (Gemma 3: local / global bases)
    fused_projections: bool = False  # the checkpoint stores qkv_proj and gate_up_proj (Phi-3)
    layers: tuple[LayerSpec, ...] = ()
    moe: MoeSpec | None = None

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.attn_scale is None else self.attn_scale


@dataclass(frozen=True)
class Adapter:
    """One family: the HF classes it accepts and the function reading its config into an `ArchSpec`."""

    classes: tuple[str, ...]
    resolve: Callable[[object, ArchSpec], ArchSpec]


def _refuse(what: str) -> EngineError:
    return EngineError(f"the built-in engine does not implement {what}; {USE_INSTEAD}")


def _activation(name) -> str:
    if name not in ACTIVATIONS:
        raise _refuse(f"the activation {name!r} (it implements {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _window_all(cfg, base: ArchSpec) -> tuple[LayerSpec, ...]:
    """Mistral, Phi-3, Qwen3-MoE: one `config.sliding_window` (or none) for every layer."""
    window = getattr(cfg, "sliding_window", None)
    return tuple(replace(layer, window=window) for layer in base.layers)


def _window_by_layer_type(cfg, base: ArchSpec) -> tuple[LayerSpec, ...]:
    """Qwen2/3, Gemma 2/3, SmolLM3: `config.sliding_window` on the layers typed "sliding_attention"."""
    types = getattr(cfg, "layer_types", None)
    if types is None:  # transformers 4.x configs had no layer_types; their windows were placed otherwise
        raise _refuse(f"a {cfg.model_type} config without layer_types (transformers >= 5 writes them)")
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise _refuse(f"the layer types {unknown} (only full_attention and sliding_attention)")
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in types and not window:
        raise _refuse("sliding_attention layers without a sliding_window size")
    return tuple(replace(layer, window=window if t == "sliding_attention" else None)
                 for layer, t in zip(base.layers, types))


# ---------------------------------------------------------------------------------------------
# The families. Each reads only what its HF modeling code reads, and refuses what it cannot honour.
# ---------------------------------------------------------------------------------------------

def _llama(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, activation=_activation(cfg.hidden_act))


def _mistral(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, activation=_activation(cfg.hidden_act), layers=_window_all(cfg, s))


def _qwen2(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, activation=_activation(cfg.hidden_act), layers=_window_by_layer_type(cfg, s))


def _qwen3(cfg, s: ArchSpec) -> ArchSpec:
    return replace(_qwen2(cfg, s), qk_norm="head")


def _qwen3_moe(cfg, s: ArchSpec) -> ArchSpec:
    sparse_step = cfg.decoder_sparse_step
    only_dense = set(cfg.mlp_only_layers or ())
    experts = cfg.num_experts
    layers = tuple(replace(layer, window=getattr(cfg, "sliding_window", None),
                           moe=experts > 0 and i not in only_dense and (i + 1) % sparse_step == 0)
                   for i, layer in enumerate(s.layers))
    return replace(s, activation=_activation(cfg.hidden_act), qk_norm="head", layers=layers,
                   moe=MoeSpec(top_k=cfg.num_experts_per_tok, norm_topk_prob=bool(cfg.norm_topk_prob)))


def _gemma(cfg, s: ArchSpec) -> ArchSpec:
    if getattr(cfg, "use_bidirectional_attention", False):
        raise _refuse("bidirectional attention (use_bidirectional_attention=True)")
    return replace(s, norm="offset", activation=_activation(cfg.hidden_act),
                   embed_scale=cfg.hidden_size ** 0.5, embed_scale_in_dtype=True)


def _gemma2(cfg, s: ArchSpec) -> ArchSpec:
    if getattr(cfg, "use_bidirectional_attention", False):
        raise _refuse("bidirectional attention (use_bidirectional_attention=True)")
    return replace(s, norm="offset", layout="sandwich", activation=_activation(cfg.hidden_activation),
                   attn_scale=cfg.query_pre_attn_scalar ** -0.5, attn_softcap=cfg.attn_logit_softcapping,
                   final_softcap=cfg.final_logit_softcapping, embed_scale=cfg.hidden_size ** 0.5,
                   embed_scale_in_dtype=True, layers=_window_by_layer_type(cfg, s))


def _gemma3(cfg, s: ArchSpec) -> ArchSpec:
    if cfg.attn_logit_softcapping is not None:
        # HF's Gemma 3 attention stores the value but never applies it: refuse rather than pick a side.
        raise _refuse("attn_logit_softcapping on Gemma 3 (Hugging Face's Gemma 3 code ignores it)")
    s = replace(_gemma2(cfg, s), qk_norm="head", attn_softcap=None, rope_by_layer_type=True)
    return replace(s, layers=tuple(replace(layer, rope=t) for layer, t in zip(s.layers, cfg.layer_types)))


def _phi3(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, activation=_activation(cfg.hidden_act), partial_rotary=True, fused_projections=True,
                   layers=_window_all(cfg, s))


def _olmo2(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, norm="scale_then_round", layout="post", qk_norm="projection",
                   activation=_activation(cfg.hidden_act))


def _smollm3(cfg, s: ArchSpec) -> ArchSpec:
    s = _qwen2(cfg, s)
    # `no_rope_layers[i]` is 1 where layer i DOES use rotary (HF's name reads the other way round).
    ropes = ["default" if use else None for use in cfg.no_rope_layers[:len(s.layers)]]
    return replace(s, layers=tuple(replace(layer, rope=r) for layer, r in zip(s.layers, ropes)))


def _granite(cfg, s: ArchSpec) -> ArchSpec:
    return replace(s, activation=_activation(cfg.hidden_act), attn_scale=cfg.attention_multiplier,
                   embed_scale=cfg.embedding_multiplier, residual_scale=cfg.residual_multiplier,
                   logits_divisor=cfg.logits_scaling)


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(("LlamaForCausalLM",), _llama),
    "mistral": Adapter(("MistralForCausalLM",), _mistral),
    "qwen2": Adapter(("Qwen2ForCausalLM",), _qwen2),
    "qwen3": Adapter(("Qwen3ForCausalLM",), _qwen3),
    "qwen3_moe": Adapter(("Qwen3MoeForCausalLM",), _qwen3_moe),
    "gemma": Adapter(("GemmaForCausalLM",), _gemma),
    "gemma2": Adapter(("Gemma2ForCausalLM",), _gemma2),
    "gemma3_text": Adapter(("Gemma3ForCausalLM",), _gemma3),
    "phi3": Adapter(("Phi3ForCausalLM",), _phi3),
    "olmo2": Adapter(("Olmo2ForCausalLM",), _olmo2),
    "smollm3": Adapter(("SmolLM3ForCausalLM",), _smollm3),
    "granite": Adapter(("GraniteForCausalLM",), _granite),
}


def check_model_type(cfg) -> None:
    """Refuse a config whose `model_type` is not in the table (before any weight is loaded)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ADAPTERS:
        archs = ", ".join(getattr(cfg, "architectures", None) or []) or "this architecture"
        raise _refuse(f"{archs} (model_type {model_type!r}); it runs: {', '.join(sorted(ADAPTERS))}")


def resolve_architecture(model: torch.nn.Module, max_model_len: int) -> ArchSpec:
    """The `ArchSpec` of a loaded HF causal LM, or an `EngineError` naming what is not supported.

    Args:
        model: A `*ForCausalLM` from `transformers`.
        max_model_len: The engine's longest sequence (rope types that switch tables with the
            sequence length are accepted only if every sequence stays on one table).
    """
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    cls = type(model).__name__
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise _refuse(f"the architecture {cls} (model_type {model_type!r}); it runs: {', '.join(sorted(ADAPTERS))}")
    if cls not in adapter.classes:
        raise _refuse(f"{cls} (for model_type {model_type!r} it runs {', '.join(adapter.classes)}: "
                      "text-only causal LMs)")
    if getattr(cfg, "quantization_config", None):
        raise _refuse("quantised weights (config.quantization_config is set)")
    if getattr(cfg, "is_causal", True) is False:
        raise _refuse("non-causal (bidirectional) attention (config.is_causal=False)")
    num_heads = cfg.num_attention_heads
    base = ArchSpec(
        family=model_type, num_heads=num_heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads, eps=cfg.rms_norm_eps,
        layers=(LayerSpec(),) * cfg.num_hidden_layers)
    spec = adapter.resolve(cfg, base)
    for name, params in rope_parameters(cfg, spec).items():
        _check_rope(name, params, max_model_len)
    return spec


def rope_parameters(cfg, spec: ArchSpec) -> dict[str, dict]:
    """The rope parameters of each rotary table the layers use, by table name."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x kept them in `rope_scaling` (None: default rope)
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
    names = {layer.rope for layer in spec.layers if layer.rope is not None}
    if spec.rope_by_layer_type:
        missing = sorted(names - set(params))
        if missing:
            raise _refuse(f"rope parameters without an entry for the layer types {missing}")
        return {name: params[name] for name in names}
    return {name: params for name in names}


def _check_rope(name: str, params: dict, max_model_len: int) -> None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in STATIC_ROPE_TYPES:
        return
    if rope_type == "longrope":
        # HF switches from the short to the long factors once a sequence passes this length.
        limit = params.get("original_max_position_embeddings")
        if limit is not None and max_model_len <= limit:
            return
        raise _refuse(f"longrope past original_max_position_embeddings={limit} (max_model_len={max_model_len}: "
                      "HF switches rotary tables mid-sequence); lower max_model_len to at most that")
    what = "dynamic NTK rope (its table depends on the sequence length)" if "dynamic" in rope_type else \
        f"the rope type {rope_type!r} (it implements {', '.join(STATIC_ROPE_TYPES)}, longrope)"
    raise _refuse(what + (f" for {name} layers" if name != "default" else ""))

