"""Tiny random Hugging Face models of every family in the built-in engine's architecture table.

Used by the engine's architecture conformance suite (tests/rollout/test_architectures.py) and
reusable by any test that needs "a model of family X": `build_family_model("qwen3")`.

Each model is small enough to run in well under a second on one CPU core (3 layers, hidden 64,
4 query heads over 2 KV heads, vocabulary 320) and is built so that a feature the engine ignored
would show: norm weights, biases and multipliers are random and far from their neutral values,
sliding windows (8 tokens) are shorter than the test sequences, soft-caps are small enough to bite,
MoE layers route each token to 2 of 4 experts.

`FAMILIES` are the table's families in their usual configuration; `VARIANTS` add the options a
family may switch on (biases, rope scalings, activations, windows, MoE settings). Each entry is
(config class, model class, config overrides).

Example:
    >>> from tests.model_families import FAMILIES, build_family_model
    >>> model = build_family_model("gemma2")   # a float32 Gemma2ForCausalLM in eval mode
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 320

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-6,
               initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Eager attention for the reference: transformers 5.17 runs Gemma 2 with SDPA by default, which drops
# the attention soft-cap without a word (5.24 refuses SDPA for Gemma 2); eager applies it in both.
_GEMMA2 = dict(sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation="eager")

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                       mlp_only_layers=[1])),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _GEMMA2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=8, final_logit_softcapping=5.0, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0, 1])),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5)),
}

VARIANTS: dict[str, tuple[str, str, dict]] = {
    "llama-biases": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama-gelu": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_act="gelu")),
    "llama-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 256})),
    "mistral-no-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-biases": ("Qwen3Config", "Qwen3ForCausalLM", dict(attention_bias=True, tie_word_embeddings=True)),
    "qwen3_moe-unnormed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                           dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                                decoder_sparse_step=2)),
    "phi3-sliding": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8)),
    "granite-biases": ("GraniteConfig", "GraniteForCausalLM",
                       dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                            logits_scaling=8.0, attention_bias=True, mlp_bias=True)),
}

ALL = {**FAMILIES, **VARIANTS}
OFFSET_NORM_FAMILIES = ("GemmaConfig", "Gemma2Config", "Gemma3TextConfig")  # RMSNorm scales by 1 + w


def family_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of family (or variant) `name`, with `overrides` on top."""
    config_cls, _, extra = ALL[name]
    return getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})


def build_family_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 `*ForCausalLM` of family (or variant) `name` in eval mode, random but reproducible.

    Norm weights are drawn around their neutral value with spread 0.5 (around 0 for Gemma's
    `1 + w` norms), biases with std 0.2; the other weights keep HF's init (std 0.1).
    """
    config_cls, model_cls, _ = ALL[name]
    config = family_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                neutral = 0.0 if config_cls in OFFSET_NORM_FAMILIES else 1.0
                p.copy_(neutral + 0.5 * torch.randn(p.shape, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.float().eval()
