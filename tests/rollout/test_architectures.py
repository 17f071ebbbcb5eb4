"""The built-in engine on every family of its architecture table, against Hugging Face.

For each family and variant of `tests/model_families.py` (a tiny random model whose every feature
would show if ignored), on `embedded` and `embedded-async`:
- greedy output equals HF `generate` (see `tests/hf_reference.py` for near-ties on a GPU);
- logprobs of sampled tokens equal HF's teacher-forced forward within 1e-4 (float32, CPU);
- a second turn that extends the first reuses its KV (`prompt_cached_tokens > 0`) and is still exact;
- after `update_weights` with perturbed weights, the engine equals HF with the new weights, and the
  stale prefix cache is not hit.
Then every option outside the table is refused at load with an `EngineError` naming it, and the
suite itself is checked: an engine that leaves out one feature fails it.

`AGENTRL_TEST_DEVICE=cuda` runs the engines on the GPU (float32 weights; a GPU's summation order
widens the logprob tolerance to 2e-3, and greedy paths may part only at near-ties). There the
families exercise both the fused kernels and the torch fallbacks (docs/architectures.md).
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
from dataclasses import replace

import pytest
import torch
import transformers

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams
from tests.hf_reference import assert_greedy_matches, assert_logprobs_match
from tests.model_families import ALL, VOCAB, build_family_model

DEVICE = os.environ.get("AGENTRL_TEST_DEVICE", "cpu")
TOL = 1e-4 if DEVICE == "cpu" else 2e-3
TIE_TOL = 1e-5 if DEVICE == "cpu" else 2 * TOL
MAX_LEN = 256
BLOCK = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they cost 10-30x in waits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_engine(model, backend: str = "embedded", **kw) -> EmbeddedEngine:
    kw = {"max_model_len": MAX_LEN, "block_size": BLOCK, "kv_cache_tokens": 4096, **kw}
    return EmbeddedEngine(model, device=DEVICE, async_steps=backend == "embedded-async", **kw)


def run(engine, prompts, sampling):
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)

    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, samplings)))

    return asyncio.run(go())


def prompts_for(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 13, 29)]  # 29: past the 8-token windows


def check_greedy(engine, hf, prompts, new: int, what: str):
    outs = run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=new))
    for p, out in zip(prompts, outs):
        assert_greedy_matches(hf, p, out.token_ids, out.logprobs, TOL, TIE_TOL, what)
    return outs


@pytest.mark.parametrize("backend", ["embedded", "embedded-async"])
@pytest.mark.parametrize("family", list(ALL))
def test_family_matches_hf(family, backend):
    hf = build_family_model(family)
    engine = make_engine(copy.deepcopy(hf), backend)
    prompts = prompts_for()
    first = check_greedy(engine, hf, prompts, 12, f"{family} greedy: ")
    sps = [SamplingParams(temperature=0.8, max_tokens=16, seed=i) for i in range(len(prompts))]
    for p, out in zip(prompts, run(engine, prompts, sps)):
        assert_logprobs_match(hf, p, out.token_ids, out.logprobs, 0.8, TOL, f"{family} sampled: ")
    # A second turn: the first turn's prompt and answer, then new tokens; its prefix is in the cache.
    turn2 = prompts[2] + list(first[2].token_ids) + [7, 11, 13, 17, 19]
    second = check_greedy(engine, hf, [turn2], 8, f"{family} second turn: ")[0]
    assert second.prompt_cached_tokens >= (len(prompts[2]) + 12 - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("backend", ["embedded", "embedded-async"])
@pytest.mark.parametrize("family", list(ALL))
def test_update_weights_per_family(family, backend):
    hf = build_family_model(family)
    engine = make_engine(copy.deepcopy(hf), backend)
    p = prompts_for(1)[2]
    before = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=10))[0]
    new = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every tensor moves by ~30% of itself (norm weights, biases and Gemma's 1 + w included)
        for w in new.parameters():
            w.add_(0.3 * w.abs().mean() * torch.randn(w.shape, generator=gen))
    engine.update_weights(new.state_dict(), version=2)
    after = check_greedy(engine, new, [p], 10, f"{family} after update_weights: ")[0]
    assert after.weight_version == 2
    moved = max(abs(a - b) for a, b in zip(after.logprobs, before.logprobs))
    assert after.token_ids != before.token_ids or moved > 100 * TOL  # the update changed the distribution
    assert after.prompt_cached_tokens == 0  # the old weights' KV of this prompt was dropped


# -- refusals --------------------------------------------------------------------------------------

def _tiny(config_cls: str, model_cls: str, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**common, **kw})).eval()


def _with_config(family: str, **changes):
    """A family model whose config is changed after construction (an option HF's code may not even build)."""
    model = build_family_model(family)
    for key, value in changes.items():
        setattr(model.config, key, value)
    return model


def _extra_parameter():
    model = build_family_model("llama")
    model.model.layers[1].self_attn.register_parameter("gate_scale", torch.nn.Parameter(torch.ones(4)))
    return model


def _rope(family: str, **params):
    model = build_family_model(family)
    model.config.rope_parameters = {**model.config.rope_parameters, **params}
    return model


REFUSED = {
    "gpt2": (lambda: _tiny("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4), "GPT2LMHeadModel"),
    "mixtral": (lambda: _tiny("MixtralConfig", "MixtralForCausalLM", num_local_experts=4), "MixtralForCausalLM"),
    "qwen2_moe": (lambda: _tiny("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32), "Qwen2MoeForCausalLM"),
    "relu": (lambda: build_family_model("llama", hidden_act="relu"), "activation 'relu'"),
    "gelu_new": (lambda: build_family_model("llama", hidden_act="gelu_new"), "activation 'gelu_new'"),
    "gemma2-activation": (lambda: build_family_model("gemma2", hidden_activation="relu2"), "activation 'relu2'"),
    "dynamic-rope": (lambda: build_family_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                         "rope_theta": 10000.0}), "dynamic NTK"),
    "new-rope-type": (lambda: _rope("qwen3", rope_type="mrope"), "rope type 'mrope'"),
    "longrope-past-switch": (lambda: build_family_model("phi3", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
        "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "partial_rotary_factor": 0.5},
        original_max_position_embeddings=64), "longrope"),
    "bidirectional-gemma": (lambda: build_family_model("gemma", use_bidirectional_attention=True), "bidirectional"),
    "not-causal": (lambda: _with_config("qwen3", is_causal=False), "non-causal"),
    "quantized": (lambda: _with_config("llama", quantization_config={"quant_method": "bitsandbytes"}), "quantised"),
    "gemma3-attn-softcap": (lambda: _with_config("gemma3", attn_logit_softcapping=20.0), "attn_logit_softcapping"),
    "smollm3-window-mismatch": (lambda: build_family_model("smollm3", sliding_window=8, use_sliding_window=False,
                                                           layer_types=["sliding_attention"] * 3), "disagree"),
    "unknown-layer-type": (lambda: _with_config("qwen3", layer_types=["full_attention", "chunked_attention",
                                                                      "full_attention"]), "chunked_attention"),
    "unread-parameter": (_extra_parameter, "layers.1.self_attn.gate_scale"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_is_refused_at_load(case):
    build, needle = REFUSED[case]
    with pytest.raises(EngineError) as err:
        make_engine(build())
    message = str(err.value)
    assert needle in message and "rollout.engine: sglang" in message, message


def test_unsupported_model_type_is_refused_before_loading_weights(tmp_path):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    config.save_pretrained(tmp_path)  # a config and no weights: the refusal must not need them
    with pytest.raises(EngineError, match="gpt2"):
        EmbeddedEngine(str(tmp_path))


def test_longrope_within_its_short_range_is_exact():
    """Below `original_max_position_embeddings` HF uses the short factors only: one static table."""
    hf = build_family_model("phi3", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": MAX_LEN,
        "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [4.0] * 4, "partial_rotary_factor": 0.5},
        original_max_position_embeddings=MAX_LEN)  # Phi-3 copies its top-level value over the rope parameters'
    check_greedy(make_engine(copy.deepcopy(hf)), hf, prompts_for(2), 10, "phi3 longrope: ")


# -- the suite can fail: each feature, left out, is caught ------------------------------------------

def _spec(**change):
    """Leave a feature out of the spec; re-bind, since plans and scales are made from the spec at bind."""
    def drop(runner):
        runner.spec = replace(runner.spec, **change)
        runner.bind()
    return drop


def _layers(**change):
    def drop(runner):
        runner.spec = replace(runner.spec, layers=tuple(replace(layer, **change) for layer in runner.spec.layers))
        runner.bind()
    return drop


def _weights(**change):
    def drop(runner):
        for lw in runner.layers:
            for name, value in change.items():
                setattr(lw, name, value)
    return drop


def _no_qk_norm(runner):  # read at every step; re-binding would refuse the q/k norm weights nobody reads
    runner.spec = replace(runner.spec, qk_norm=None)


def _no_topk_renorm(runner):
    runner.spec = replace(runner.spec, moe=replace(runner.spec.moe, norm_topk_prob=False))


DROPPED = {
    "gemma: embedding scale": ("gemma", _spec(embed_scale=None)),
    "gemma: 1 + w norms": ("gemma", _spec(norm="round_then_scale")),
    "gemma2: attention soft-cap": ("gemma2", _spec(attn_softcap=None)),
    "gemma2: final soft-cap": ("gemma2", _spec(final_softcap=None)),
    "gemma2: post-attention and post-MLP norms": ("gemma2", _weights(attn_out=None, mlp_out=None)),
    "gemma3: local rope base": ("gemma3", _layers(rope="full_attention")),
    "qwen3: q/k norms": ("qwen3", _no_qk_norm),
    "olmo2: q/k norms": ("olmo2", _no_qk_norm),
    "granite: residual multiplier": ("granite", _spec(residual_scale=None)),
    "granite: logits scaling": ("granite", _spec(logits_divisor=None)),
    "llama-gelu: activation": ("llama-gelu", _spec(activation="silu")),
    "llama-biases: MLP biases": ("llama-biases", _weights(gate_up_b=None, down_b=None)),
    "qwen3_moe: top-k renormalisation": ("qwen3_moe", _no_topk_renorm),
    "mistral: sliding window": ("mistral", _layers(window=None)),
    "smollm3: NoPE layers": ("smollm3", _layers(rope="default")),
}


@pytest.mark.parametrize("case", list(DROPPED))
def test_a_feature_left_out_is_caught(case):
    family, drop = DROPPED[case]
    hf = build_family_model(family)
    engine = make_engine(copy.deepcopy(hf))
    drop(engine.runner)
    p = prompts_for(3)[2]
    out = run(engine, [p], SamplingParams(temperature=1.0, max_tokens=8, seed=0))[0]
    with pytest.raises(AssertionError, match="logprobs differ"):
        assert_logprobs_match(hf, p, out.token_ids, out.logprobs, 1.0, TOL)
