"""The vllm backend's pure mappings (agentrl/rollout/backends/vllm/params.py and launch.py), no vLLM needed.

Expected values are written out by hand from vLLM 0.24's source: the `SamplingParams` and
`CompletionRequest` field names, the streamed `CompletionStreamResponse` shape, the engine
argument names and their command-line spelling (`--x` / `--no-x` for booleans).
"""

from __future__ import annotations

import sys

import pytest
import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.vllm import launch
from agentrl.rollout.backends.vllm.params import (
    Delta,
    check_logprob_contract,
    completion_body,
    error_text,
    finish_reason,
    parse_completion_chunk,
    vllm_sampling_kwargs,
)
from agentrl.rollout.engine import SamplingParams

# (sampling, logprobs_mode, served?) -- the table in params.py's docstring, case by case.
CONTRACT = [
    (SamplingParams(temperature=0.0), "processed_logprobs", True),  # greedy reports T = 1 in both modes
    (SamplingParams(temperature=0.0, top_k=5), "processed_logprobs", True),  # vLLM resets truncation for greedy
    (SamplingParams(temperature=0.7), "processed_logprobs", True),  # log_softmax(logits / 0.7), nothing cut
    (SamplingParams(temperature=1.0, top_p=0.9), "processed_logprobs", False),  # renormalised after top-p
    (SamplingParams(temperature=0.7, top_k=3), "processed_logprobs", False),
    (SamplingParams(temperature=1.2, min_p=0.1), "processed_logprobs", False),
    (SamplingParams(temperature=1.0, top_p=0.9, top_k=3), "raw_logprobs", True),  # raw = before everything, T = 1
    (SamplingParams(temperature=0.0), "raw_logprobs", True),
    (SamplingParams(temperature=0.7), "raw_logprobs", False),  # raw is before the temperature
    (SamplingParams(temperature=2.5), "processed_logprobs", False),  # vLLM's own limit is T <= 2
]


@pytest.mark.parametrize("sampling,mode,served", CONTRACT)
def test_logprob_contract_table(sampling, mode, served):
    if served:
        check_logprob_contract(sampling, mode)
    else:
        with pytest.raises(EngineError) as err:
            check_logprob_contract(sampling, mode)
        assert "temperature" in str(err.value)  # every refusal names what to change


def test_logit_modes_are_refused():
    with pytest.raises(EngineError, match="processed_logprobs"):
        check_logprob_contract(SamplingParams(), "raw_logits")


def test_sampling_kwargs_name_vllm_fields():
    sp = SamplingParams(temperature=0.5, top_p=0.8, top_k=4, min_p=0.05, max_tokens=9, stop_token_ids=(7, 8), seed=3)
    assert vllm_sampling_kwargs(sp) == dict(
        n=1, temperature=0.5, top_p=0.8, top_k=4, min_p=0.05, seed=3, max_tokens=9, stop_token_ids=[7, 8],
        ignore_eos=True, logprobs=0, detokenize=False, skip_special_tokens=False,
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)


def test_completion_body_sends_every_sampling_field():
    body = completion_body([5, 6], SamplingParams(temperature=0.0, max_tokens=3, stop_token_ids=(2,)))
    assert body == dict(
        prompt=[5, 6], max_tokens=3, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, stop_token_ids=[2],
        ignore_eos=True, logprobs=0, return_token_ids=True, return_tokens_as_token_ids=True,
        skip_special_tokens=False, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
        stream=True, stream_options={"include_usage": True})
    assert "seed" not in body  # vLLM: a missing seed draws fresh randomness
    assert completion_body([1], SamplingParams(seed=0))["seed"] == 0


def test_stream_chunks_parse():
    # A CompletionStreamResponse chunk with two tokens, then the usage chunk (choices empty).
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [{
        "index": 0, "text": "", "finish_reason": None, "stop_reason": None, "token_ids": [11, 12],
        "logprobs": {"text_offset": [0, 10], "token_logprobs": [-0.5, -1.25],
                     "tokens": ["token_id:11", "token_id:12"], "top_logprobs": [{"token_id:11": -0.5}, None]}}]}
    assert parse_completion_chunk(chunk) == Delta((11, 12), (-0.5, -1.25), None, None)
    last = {**chunk, "choices": [{**chunk["choices"][0], "token_ids": [2], "finish_reason": "stop", "stop_reason": 2,
                                  "logprobs": {"token_logprobs": [-0.1]}}]}
    assert parse_completion_chunk(last) == Delta((2,), (-0.1,), "stop", None)
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3,
                                                     "prompt_tokens_details": {"cached_tokens": 32}}}
    assert parse_completion_chunk(usage) == Delta(cached_tokens=32)
    assert parse_completion_chunk({"choices": [], "usage": {"prompt_tokens": 4}}) == Delta()


def test_bad_chunks_raise_with_the_servers_text():
    with pytest.raises(EngineError, match="KV load failed"):
        parse_completion_chunk({"error": {"message": "KV load failed", "type": "InternalServerError", "code": 500}})
    with pytest.raises(EngineError, match="logprobs=0"):  # ids without logprobs: not a server agentrl can use
        parse_completion_chunk({"choices": [{"token_ids": [1, 2], "logprobs": None, "finish_reason": None}]})
    with pytest.raises(EngineError, match="internal error"):
        finish_reason("error")
    assert [finish_reason(r) for r in ("stop", "length", "abort", None)] == ["stop", "length", "abort", None]


def test_error_text():
    body = b'{"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError", "code": 400}}'
    assert error_text(400, body) == "HTTP 400: max_tokens must be at least 1"
    assert error_text(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"


def test_options_split_and_engine_kwargs():
    opts, rest = launch.BackendOptions.split({"gpu_memory_utilization": 0.5, "enforce_eager": True,
                                              "logprobs_mode": "raw_logprobs", "staging_dir": "/x"})
    assert opts.logprobs_mode == "raw_logprobs" and opts.staging_dir == "/x"
    assert rest == {"gpu_memory_utilization": 0.5, "enforce_eager": True}
    kw = launch.engine_kwargs("/m", torch.bfloat16, 2048, opts, rest)
    assert kw == {"model": "/m", "dtype": "bfloat16", "max_model_len": 2048, "skip_tokenizer_init": True,
                  "enable_prefix_caching": True, "logprobs_mode": "raw_logprobs", "enable_sleep_mode": True,
                  "gpu_memory_utilization": 0.5, "enforce_eager": True}
    nccl, _ = launch.BackendOptions.split({"weight_sync": "nccl"})
    assert launch.engine_kwargs("/m", torch.float32, 8, nccl, {})["weight_transfer_config"] == {"backend": "nccl"}


def test_bad_options_are_refused():
    with pytest.raises(EngineError, match="Did you mean 'disk'"):
        launch.BackendOptions.split({"weight_sync": "dsk"})
    with pytest.raises(EngineError, match="logprobs_mode"):
        launch.BackendOptions.split({"logprobs_mode": "processed_logits"})
    with pytest.raises(EngineError, match="Did you mean 'gpu_memory_utilization'"):
        launch.check_engine_kwargs({"gpu_mem_utilization": 0.5}, {"gpu_memory_utilization", "model"})
    with pytest.raises(EngineError, match="dtype"):
        launch.dtype_name(torch.int8)


def test_server_command_line():
    opts, rest = launch.BackendOptions.split({"enforce_eager": True, "enable_chunked_prefill": False,
                                              "gpu_memory_utilization": 0.4, "seed": None,
                                              "compilation_config": {"level": 0}})
    kw = launch.engine_kwargs("/m", torch.float16, 1024, opts, rest)
    argv = launch.server_argv(8123, kw, opts)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == [
        "--model", "/m", "--dtype", "float16", "--max-model-len", "1024", "--skip-tokenizer-init",
        "--enable-prefix-caching", "--logprobs-mode", "processed_logprobs", "--enable-sleep-mode",
        "--enforce-eager", "--no-enable-chunked-prefill", "--gpu-memory-utilization", "0.4",
        "--compilation-config", '{"level": 0}',
        "--host", "127.0.0.1", "--port", "8123", "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
    own, _ = launch.BackendOptions.split({"launcher": ["vllm", "serve"]})
    assert launch.server_argv(1, {}, own)[:2] == ["vllm", "serve"]
    own, _ = launch.BackendOptions.split({"launcher": "/opt/venv/bin/python -m vllm.entrypoints.openai.api_server"})
    assert own.launcher == ("/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server")
