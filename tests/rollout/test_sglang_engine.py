"""The sglang backend's front (agentrl/rollout/backends/sglang/engine.py) on CPU.

SGLang itself does not run here. In-process, `engine_factory` builds the stand-in of
tests/rollout/sglang_protocol/standin.py instead of `sglang.Engine` (same surface, backed by the
built-in engine, recording every call), so these tests check what the adapter passes to
`sglang.Engine(...)` and `async_generate(...)`, and how it handles what comes back. Server mode runs
against the stand-in launched as a real HTTP server process. The conformance suite runs the common
checks through the HTTP client (`sglang-protocol` in test_conformance.py).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal

import pytest
import torch
from sglang_protocol import make_engine as protocol_engine
from sglang_protocol.standin import StandinSGLang
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentrl.errors import EngineError, ServerStartError
from agentrl.rollout.backends.managed import ServerSpec
from agentrl.rollout.backends.sglang import SGLangEngine
from agentrl.rollout.engine import SamplingParams
from tests.hf_reference import hf_greedy


def run(engine, prompts, sampling):
    async def go():
        return await asyncio.gather(*(engine.generate(p, sampling) for p in prompts))
    return asyncio.run(go())


@pytest.fixture(scope="module")
def prompt(tiny_model_dir) -> list[int]:
    return AutoTokenizer.from_pretrained(tiny_model_dir).encode("Ann buys 3 packs of 9 stickers and finds 2 more.")


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with large random changes: its greedy outputs vary (the tiny model's repeat one token)."""
    out = tmp_path_factory.mktemp("varied")
    perturbed(tiny_model_dir, 1).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(tiny_model_dir, name)):
            shutil.copy(os.path.join(tiny_model_dir, name), out)
    return str(out)


@pytest.fixture(scope="module")
def hf(varied_model_dir):
    return AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()


def in_process(model_dir, **kw) -> SGLangEngine:
    factory = kw.pop("factory", StandinSGLang)
    return SGLangEngine(model_dir, device="cpu", dtype=torch.float32, engine_factory=factory, **kw)


def test_in_process_arguments_and_requests(varied_model_dir, prompt, hf):
    engine = in_process(varied_model_dir, max_model_len=512, mem_fraction_static=0.5)
    try:
        sg = engine._transport.engine
        assert sg.kwargs == {"model_path": varied_model_dir, "skip_tokenizer_init": True, "dtype": "float32",
                             "context_length": 512, "random_seed": 0, "device": "cpu", "weight_version": "0",
                             "enable_deterministic_inference": True, "mem_fraction_static": 0.5}
        out = run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(999,)))[0]
        call = sg.calls[0]
        assert set(call) == {"rid", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "stream"}
        assert call["input_ids"] == prompt and call["return_logprob"] is True and call["logprob_start_len"] == -1
        assert call["sampling_params"]["stop_token_ids"] == [999] and call["sampling_params"]["ignore_eos"] is False
        assert isinstance(call["sampling_params"]["sampling_seed"], int)  # a fresh seed for an unseeded request
        # The model's EOS (2) would stop the stand-in as it stops SGLang; the backend goes on past it.
        assert list(out.token_ids) == hf_greedy(hf, prompt, 6) and out.finish_reason == "length"
        assert out.weight_version == 0 and len(out.logprobs) == 6
    finally:
        engine.close()


def test_a_stop_at_an_eos_id_not_asked_for_is_continued(varied_model_dir, prompt, hf):
    """SGLang stops at the model's EOS ids besides the request's stop ids; the backend goes on past them."""
    greedy = hf_greedy(hf, prompt, 16)
    j = next(j for j in range(4, 16) if greedy[j] not in greedy[:j])  # a stop token whose first use is at j
    eos = greedy[2] if greedy[2] != greedy[j] else greedy[3]
    assert eos not in greedy[j:j + 1]
    engine = in_process(varied_model_dir, factory=functools.partial(StandinSGLang, eos_token_ids={eos}))
    try:
        out = run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=(greedy[j],)))[0]
        assert list(out.token_ids) == greedy[:j + 1] and out.finish_reason == "stop"
        calls = engine._transport.engine.calls
        stops = greedy[:j].count(eos)
        assert len(calls) == stops + 1 and engine.stats.extra["eos_continuations"] == stops
        first_stop = greedy.index(eos) + 1
        assert calls[1]["input_ids"] == prompt + greedy[:first_stop]  # the continuation resends what came
        assert calls[1]["sampling_params"]["max_new_tokens"] == 16 - first_stop
    finally:
        engine.close()


def test_identical_prompts_wait_for_the_first_ones_prefill(tiny_model_dir):
    engine = in_process(tiny_model_dir)
    try:
        p = list(range(10, 50))  # 40 tokens: 2 full blocks of the built-in engine behind the stand-in
        outs = run(engine, [p] * 4, SamplingParams(max_tokens=4))
        assert engine.stats.extra["gated_requests"] == 3
        # The first is prefilled alone; the others find its two full blocks in the prefix cache.
        assert outs[0].prompt_cached_tokens == 0 and all(o.prompt_cached_tokens >= 32 for o in outs[1:])
        cached = sum(o.prompt_cached_tokens for o in outs)
        assert engine.stats.extra["prefix_cache_hit_rate"] == pytest.approx(cached / 160)
    finally:
        engine.close()


def test_stop_string_cut_aborts_the_request_in_sglang(varied_model_dir, prompt, hf):
    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    greedy = hf_greedy(hf, prompt, 40)
    stop = tok.decode(greedy[3:5])
    engine = in_process(varied_model_dir)
    try:
        out = run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))[0]
        end = next(k for k in range(1, 41) if stop in tok.decode(greedy[:k]))
        assert list(out.token_ids) == greedy[:end] and out.finish_reason == "stop"
        sg = engine._transport.engine
        assert sg.calls[0]["sampling_params"]["stream_interval"] == 8
        assert (sg.calls[0]["rid"], False) in sg.aborts  # left early: aborted by rid, not run to the end
    finally:
        engine.close()


def test_abort_and_cancellation_reach_sglang(tiny_model_dir, prompt):
    engine = in_process(tiny_model_dir, max_model_len=1024)
    sg = engine._transport.engine

    async def go():
        task = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=900)))
        while engine.stats.generated_tokens < 2:
            await asyncio.sleep(0.01)
        engine.abort()
        aborted = await asyncio.wait_for(task, 30)
        cancelled = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=900)))
        while len(sg.calls) < 2:
            await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        for _ in range(200):  # the caller's side is done; the engine's loop aborts it in SGLang right after
            if (sg.calls[1]["rid"], False) in sg.aborts:
                break
            await asyncio.sleep(0.01)
        return aborted

    try:
        out = asyncio.run(go())
        assert out.finish_reason == "abort" and 1 <= len(out.token_ids) < 900
        assert ("", True) in sg.aborts and (sg.calls[1]["rid"], False) in sg.aborts
    finally:
        engine.close()


def test_requests_fail_instead_of_hanging_when_the_scheduler_dies(tiny_model_dir, prompt):
    """SGLang's watchdog signals SIGQUIT when its scheduler dies; requests in flight then raise."""
    before = signal.getsignal(signal.SIGQUIT)
    engine = in_process(tiny_model_dir, max_model_len=1024)

    async def go():
        task = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=900)))
        while engine.stats.generated_tokens < 2:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGQUIT)
        return await asyncio.wait_for(task, 30)

    try:
        with pytest.raises(EngineError, match="scheduler process died"):
            asyncio.run(go())
        with pytest.raises(EngineError, match="scheduler process died"):
            run(engine, [prompt], SamplingParams(max_tokens=2))
    finally:
        engine.close()
    assert signal.getsignal(signal.SIGQUIT) == before


def test_refusals(tiny_model_dir, prompt, monkeypatch):
    engine = in_process(tiny_model_dir, max_model_len=64)
    try:
        with pytest.raises(EngineError, match="max_model_len is 64"):
            run(engine, [list(range(3, 70))], SamplingParams())
        with pytest.raises(EngineError, match=r"token ids must be in \[0, 415\)"):
            run(engine, [[1, 5000]], SamplingParams())
        with pytest.raises(EngineError, match="enable_memory_saver=True"):
            engine.sleep()
    finally:
        engine.close()
    nondeterministic = in_process(tiny_model_dir, enable_deterministic_inference=False)
    try:
        with pytest.raises(EngineError, match="ignores per-request seeds"):
            run(nondeterministic, [prompt], SamplingParams(seed=3))
    finally:
        nondeterministic.close()
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(EngineError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        in_process(tiny_model_dir)


# -- server mode, against the stand-in launched as a real server process -----------------------

def perturbed(model_dir: str, seed: int):
    """The model with large random changes to every weight (greedy outputs change)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    return model.eval()


def test_server_restart_resyncs_the_current_weights(tiny_model_dir, prompt, tmp_path):
    engine = protocol_engine(tiny_model_dir, log_dir=str(tmp_path / "servers"), weights_dir=str(tmp_path / "w"))
    try:
        new = perturbed(tiny_model_dir, 1)
        engine.update_weights(new.state_dict(), version=3)
        assert os.listdir(tmp_path / "w") == [os.path.basename(engine._weights.current)]
        before = run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]
        assert list(before.token_ids) == hf_greedy(new, prompt, 10) and before.weight_version == 3
        os.killpg(engine._server.pid, signal.SIGKILL)  # the server dies between two requests
        after = run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]
        assert engine._server.restarts == 1
        assert after.token_ids == before.token_ids and after.weight_version == 3
        assert "restart 1" in (tmp_path / "servers" / "sglang.log").read_text()
    finally:
        engine.close()


def test_url_mode_adopts_the_servers_settings_and_leaves_it_running(tiny_model_dir, prompt):
    owner = protocol_engine(tiny_model_dir)
    try:
        owner.update_weights(perturbed(tiny_model_dir, 2).state_dict(), version=5)
        client = SGLangEngine(tiny_model_dir, server=ServerSpec(url=owner._server.url))
        assert client.deterministic and client.weight_version == 5 and client.max_model_len == owner.max_model_len
        a = run(client, [prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]
        client.close()
        b = run(owner, [prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]  # still up
        assert a.token_ids == b.token_ids and a.weight_version == 5
    finally:
        owner.close()


def test_sleep_and_wake_through_the_server(tiny_model_dir, prompt):
    engine = protocol_engine(tiny_model_dir, enable_memory_saver=True)
    try:
        with pytest.raises(EngineError, match="enable_weights_cpu_backup=True"):
            engine.sleep(level=2)
        engine.sleep()
        with pytest.raises(EngineError, match="asleep"):
            run(engine, [prompt], SamplingParams(max_tokens=2))
        engine.wake()
        assert len(run(engine, [prompt], SamplingParams(max_tokens=2))[0].token_ids) == 2
    finally:
        engine.close()


def test_timeouts_and_start_failures_say_what_happened(tiny_model_dir, prompt):
    engine = protocol_engine(tiny_model_dir, request_timeout_s=0.001, max_model_len=1024)
    try:
        with pytest.raises(EngineError, match="timed out after 0.001 s"):
            run(engine, [prompt], SamplingParams(max_tokens=900))
    finally:
        engine.close()
    with pytest.raises(ServerStartError, match="unrecognized arguments: --no-such-option 1"):
        protocol_engine(tiny_model_dir, no_such_option=1)

