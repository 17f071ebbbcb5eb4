"""The engine conformance suite: what every backend (embedded, sglang, vllm) must do, on a real tiny model.

Parameterised by backend name. A backend runs here when its package imports and it is registered
in `agentrl.rollout.engine.ENGINES`; otherwise its cases are skipped, so SGLang and vLLM join the
suite by registering themselves. Every reference is computed independently with Hugging Face
`transformers` on the same weights (on the CPU, float32): `generate` for greedy decoding, a full
forward pass with `log_softmax(logits / T)` for logprobs (what the trainer recomputes).

`sglang-protocol` runs the checks through the sglang backend's HTTP client against a stand-in
server that follows SGLang's documented request/response shapes, backed by the built-in engine
(tests/rollout/sglang_protocol): a protocol test, not SGLang.

`AGENTRL_TEST_DEVICE=cuda` runs the engines on the GPU (float32 weights). GPU kernels sum in
another order than the CPU reference, so logprob tolerances widen from 1e-4 to 2e-3, and greedy
outputs may part from HF's only where HF's two best tokens are within 2 * 2e-3 nats of each other
(`tests/hf_reference.py`: every greedy token's logprob is checked against HF's teacher-forced one,
and the step where the paths part must be such a near-tie). The attention kernels multiply float32
in IEEE precision (Triton's TF32 default once moved a greedy path off HF's by a 10-nat margin).

`AGENTRL_TEST_ENGINE_OPTIONS` (JSON, by backend name, e.g. `{"sglang": {"attention_backend": "triton"}}`)
passes engine options to a backend, and `AGENTRL_TEST_TOL` widens the logprob tolerance (for an
engine run in bf16); both are for the GPU proof scripts (bench/sglang_gpu.py).

The same checks for every family of the engine's architecture table: tests/rollout/test_architectures.py.

`vllm-protocol` runs the vllm backend's HTTP client against `vllm_protocol_server.py`, a stand-in that
speaks vLLM 0.24's server protocol with the embedded engine behind it: a protocol test, not vLLM.
vLLM reports logprobs after top-k/top-p/min-p truncation, so its backends refuse truncated sampling
(`agentrl/rollout/backends/vllm/params.py`); the truncation case checks the refusal for them.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentrl.errors import EngineError
from agentrl.rollout.engine import ENGINES, Engine, SamplingParams
from tests.hf_reference import assert_greedy_matches

# "embedded-async": the embedded engine launching step t+1 before step t's tokens reach the host
# (its default on CUDA), forced on here so its speculative steps are checked on CPU too.
BACKENDS = ["embedded", "embedded-async", "sglang", "vllm", "sglang-protocol", "vllm-protocol"]
# Stand-ins for an engine's HTTP protocol (module with make_engine), under tests/rollout.
PROTOCOL_TESTS = {"sglang-protocol": "sglang_protocol"}
BLOCK = 16  # the embedded engine's block size; the others cache at least at this granularity
DEVICE = os.environ.get("AGENTRL_TEST_DEVICE", "cpu")
TOL = float(os.environ.get("AGENTRL_TEST_TOL", 1e-4 if DEVICE == "cpu" else 2e-3))  # vs the float32 CPU reference
TIE_TOL = 1e-5 if DEVICE == "cpu" else 2 * TOL  # how close HF's two best tokens must be where greedy paths part


def make_engine(name: str, model_dir: str, **kwargs) -> Engine:
    if name == "embedded-async":
        return ENGINES.get("embedded")(model_dir, device=DEVICE, async_steps=True, **kwargs)
    if name in PROTOCOL_TESTS:
        return importlib.import_module(PROTOCOL_TESTS[name]).make_engine(model_dir, device=DEVICE, **kwargs)
    if name == "vllm-protocol":  # vLLM's HTTP protocol, served by a stand-in (not vLLM) on the CPU
        from vllm_protocol_server import protocol_engine

        return protocol_engine(model_dir, **kwargs)
    if name != "embedded" and importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    if name not in ENGINES:
        pytest.skip(f"no {name!r} backend is registered")
    options = json.loads(os.environ.get("AGENTRL_TEST_ENGINE_OPTIONS", "{}")).get(name, {})
    if name == "vllm":  # several engines live at once in this module, each small; no compile for a tiny model
        options = {"gpu_memory_utilization": 0.15, "enforce_eager": True, "dtype": torch.float32, **options}
    return ENGINES.get(name)(model_dir, device=DEVICE, **{**options, **kwargs})


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request) -> str:
    return request.param


def close_engine(engine: Engine) -> None:
    """Stop what an engine runs beside this process (a server, an engine core): a test leaves none."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


@pytest.fixture(scope="module")
def engine(backend, tiny_model_dir) -> Engine:
    """One engine per backend, shared by the read-only cases (they never change weights)."""
    shared = make_engine(backend, tiny_model_dir, max_model_len=4096)
    yield shared
    close_engine(shared)


@pytest.fixture
def open_engine(backend, tiny_model_dir):
    """A fresh engine of the backend for one test (it changes the engine's state), closed after it."""
    opened: list[Engine] = []

    def make(**kwargs) -> Engine:
        opened.append(make_engine(backend, tiny_model_dir, **kwargs))
        return opened[-1]

    yield make
    for e in opened:
        close_engine(e)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["What is 12 times 13 plus 5?", "A shop has 40 boxes of 12 pens; it sells 7 boxes.",
             "Ann buys 3 packs of 9 stickers and finds 2 more. How many stickers does Ann have now?"]
    return [tok.encode(t) for t in texts]


def run(engine: Engine, prompts, sampling: SamplingParams | list[SamplingParams]):
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)

    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, samplings)))

    return asyncio.run(go())


def recompute_logprobs(hf, prompt: list[int], output: tuple[int, ...], temperature: float) -> torch.Tensor:
    """Trainer-style: one forward over prompt + output, log_softmax(logits / T) at each output token. [T_out, V]."""
    ids = torch.tensor([prompt + list(output)])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()  # [T_out, V]
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)


def test_greedy_matches_hf_generate(engine, hf, prompts):
    outs = run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=24))
    for p, out in zip(prompts, outs):
        assert_greedy_matches(hf, p, out.token_ids, out.logprobs, TOL, TIE_TOL)
        assert out.finish_reason == "length" and len(out.logprobs) == 24


def test_sampled_logprobs_match_trainer_recompute(engine, hf, prompts):
    sps = [SamplingParams(temperature=0.7, max_tokens=32, seed=i) for i in range(len(prompts))]
    outs = run(engine, prompts, sps)
    for p, out in zip(prompts, outs):
        ref = recompute_logprobs(hf, p, out.token_ids, 0.7)
        got = torch.tensor(out.logprobs)
        expect = ref.gather(-1, torch.tensor(out.token_ids).unsqueeze(-1)).squeeze(-1)
        assert (got - expect).abs().max() < TOL


def test_long_prompts_in_chunks_match_hf(backend, open_engine, hf, prompts):
    # Prompts near the model's 1,024 positions; the built-in engine prefills them in 96-token chunks, so
    # each chunk attends over a cached prefix of earlier chunks (the paged prefill's unmasked blocks).
    # A second turn then extends the first from the prefix cache.
    kwargs = {"max_step_tokens": 96} if backend.startswith("embedded") else {}
    engine = open_engine(max_model_len=1024, **kwargs)
    longs = [(prompts[i % 3] * 80)[:n] for i, n in enumerate((1000, 777, 530))]
    outs = run(engine, longs, SamplingParams(temperature=0.0, max_tokens=12))
    for p, out in zip(longs, outs):
        assert_greedy_matches(hf, p, out.token_ids, out.logprobs, TOL, TIE_TOL, f"{len(p)}-token prompt: ")
    sps = [SamplingParams(temperature=0.8, max_tokens=12, seed=i) for i in range(3)]
    nxt = [p[:-5] + list(o.token_ids) for p, o in zip(longs, outs)]  # about the first turn, shorter
    for p, out in zip(nxt, run(engine, nxt, sps)):
        ref = recompute_logprobs(hf, p, out.token_ids, 0.8)
        expect = ref.gather(-1, torch.tensor(out.token_ids).unsqueeze(-1)).squeeze(-1)
        assert (torch.tensor(out.logprobs) - expect).abs().max() < TOL
        assert out.prompt_cached_tokens >= (len(p) - 20) // BLOCK * BLOCK - BLOCK


def test_stop_tokens_and_max_tokens(engine, prompts):
    p = prompts[0]
    greedy = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert len(greedy.token_ids) == 12 and greedy.finish_reason == "length"
    stop_at = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_at)
    out = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)


def test_stop_strings(engine, prompts, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = prompts[1]
    greedy = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=16))[0].token_ids
    stop = tok.decode(list(greedy[5:7]))
    assert stop
    # The response ends at the first token whose decoded prefix contains the stop string.
    end = next(k for k in range(1, 17) if stop in tok.decode(list(greedy[:k])))
    out = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=16, stop=(stop,)))[0]
    assert out.token_ids == greedy[:end] and out.finish_reason == "stop"


def test_seeds_are_reproducible_whatever_the_batch(engine, prompts):
    p = prompts[2]
    a = run(engine, [p], SamplingParams(max_tokens=16, seed=11))[0]
    together = run(engine, prompts, [SamplingParams(max_tokens=16, seed=s) for s in (3, 4, 11)])
    assert together[2].token_ids == a.token_ids and together[2].logprobs == pytest.approx(a.logprobs, abs=TOL / 10), (
        f"seed 11 alone: {a.token_ids} {a.logprobs}; in a batch: {together[2].token_ids} {together[2].logprobs}")
    other = run(engine, [p], SamplingParams(max_tokens=16, seed=12))[0]
    assert other.token_ids != a.token_ids


@pytest.mark.parametrize("field,value", [("top_k", 3), ("min_p", 0.3), ("top_p", 0.5)])
def test_truncation_keeps_sampled_tokens_in_the_allowed_set(backend, engine, hf, prompts, field, value):
    sps = [SamplingParams(temperature=1.5, max_tokens=24, seed=i, **{field: value}) for i in range(len(prompts))]
    if field == "min_p" and backend.startswith("sglang"):  # SGLang 0.5.17's seeded sampler has no min-p
        with pytest.raises(EngineError, match="min_p"):
            run(engine, prompts, sps)
        return
    if backend.startswith("vllm"):  # it cannot report the untruncated logprobs of a truncated draw: refused
        with pytest.raises(EngineError, match="truncation"):
            run(engine, prompts, sps)
        return
    outs = run(engine, prompts, sps)
    for p, out in zip(prompts, outs):
        logp = recompute_logprobs(hf, p, out.token_ids, 1.5)  # [T, V]
        tok = torch.tensor(out.token_ids)
        chosen = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        if field == "top_k":  # fewer than k tokens are strictly more likely (small slack for float noise)
            assert ((logp > chosen.unsqueeze(-1) + TOL / 10).sum(-1) < value).all()
        elif field == "min_p":
            assert (chosen >= logp.max(-1).values + torch.log(torch.tensor(value)) - TOL / 10).all()
        else:  # top_p: the mass strictly more likely than the chosen token is below p
            ahead = torch.where(logp > chosen.unsqueeze(-1) + TOL / 100, logp.exp(), 0.0).sum(-1)
            assert (ahead < value + TOL / 10).all()


def test_abort_returns_partial_outputs(open_engine):
    engine = open_engine(max_model_len=8192)

    async def go():
        task = asyncio.ensure_future(engine.generate([5, 6, 7, 8], SamplingParams(max_tokens=6000)))
        for _ in range(200):  # wait until it is decoding, then abort
            await asyncio.sleep(0.05)
            if getattr(engine, "stats", None) is None or engine.stats.generated_tokens >= 4:
                break
        engine.abort()
        return await asyncio.wait_for(task, 30)

    out = asyncio.run(go())
    assert out.finish_reason == "abort"
    assert 1 <= len(out.token_ids) < 6000 and len(out.logprobs) == len(out.token_ids)
    again = run(engine, [[5, 6, 7, 8]], SamplingParams(max_tokens=3))[0]  # the engine serves on after an abort
    assert again.finish_reason == "length" and len(again.token_ids) == 3


def test_update_weights_changes_outputs_and_drops_cached_kv(open_engine, tiny_model_dir, prompts):
    engine = open_engine(max_model_len=4096)
    p = prompts[2]  # longer than two blocks: a stale prefix cache would be hit
    before = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=12))[0]
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for w in new.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    engine.update_weights(new.state_dict(), version=7)
    after = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=12))[0]
    # Weights of std ~0.5 (25x the model's) make attention scores large and its softmax near one-hot,
    # where any rounding difference on a GPU moves logits most (with TF32 products in the attention
    # kernels this parted from HF by 10 nats on an H200; they now multiply float32 in IEEE).
    assert_greedy_matches(new, p, after.token_ids, after.logprobs, TOL, TIE_TOL, "after update_weights: ")
    assert after.token_ids != before.token_ids
    assert after.weight_version == 7 and after.prompt_cached_tokens == 0


def test_identical_prompts_share_their_prefill(backend, open_engine):
    engine = open_engine(max_model_len=4096)
    n, prompt = 8, list(range(10, 50))  # 40 tokens: 2 full blocks of 16
    outs = run(engine, [prompt] * n, SamplingParams(max_tokens=8))
    full_block_tokens = len(prompt) // BLOCK * BLOCK
    assert sum(o.prompt_cached_tokens for o in outs) >= (n - 1) * full_block_tokens
    if backend.startswith("embedded"):
        assert engine.stats.extra["prefix_cache_hit_rate"] >= (n - 1) / n * full_block_tokens / len(prompt)


def test_next_turn_reuses_the_previous_turns_blocks(engine, prompts):
    first = run(engine, [prompts[0] + [3] * 20], SamplingParams(temperature=0.0, max_tokens=20))[0]
    prev = prompts[0] + [3] * 20 + list(first.token_ids)
    second = run(engine, [prev + [4] * 12], SamplingParams(temperature=0.0, max_tokens=4))[0]
    # KV exists for all of `prev` but its last sampled token; every full block of that is reused.
    assert second.prompt_cached_tokens >= (len(prev) - 1) // BLOCK * BLOCK
