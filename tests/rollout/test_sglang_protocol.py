"""The sglang backend's pure mapping (agentrl/rollout/backends/sglang/protocol.py), against values
written by hand from the SGLang 0.5.17 source (field names, defaults, output shapes)."""

from __future__ import annotations

import random

import pytest
import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.sglang import protocol as P
from agentrl.rollout.engine import SamplingParams


def test_sampling_params_greedy_without_stop_tokens_ignores_the_models_eos():
    sp = P.sampling_params(SamplingParams(temperature=0.0, max_tokens=9), max_new_tokens=9, sampling_seed=5,
                           deterministic=True)
    # Temperature 0 is sent as is: SGLang turns anything below 1e-6 into temperature 1 with top_k 1.
    assert sp == {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "top_k": P.WHOLE_VOCAB_SORTED, "min_p": 0.0,
                  "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                  "min_new_tokens": 0, "n": 1, "ignore_eos": True, "stream_interval": P.STREAM_INTERVAL,
                  "sampling_seed": 5}


def test_sampling_params_with_stop_tokens_and_truncation():
    s = SamplingParams(temperature=0.7, top_p=0.9, top_k=3, max_tokens=20, stop_token_ids=(7, 2, 7))
    sp = P.sampling_params(s, max_new_tokens=12, sampling_seed=None, deterministic=True, stream_interval=8)
    assert sp["stop_token_ids"] == [2, 7] and sp["ignore_eos"] is False
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["max_new_tokens"], sp["stream_interval"]) == \
        (0.7, 0.9, 3, 12, 8)
    assert "sampling_seed" not in sp


def test_untruncated_rows_take_sglangs_sorted_sampler_in_deterministic_mode():
    # SGLang 0.5.17 indexes the seeded noise by token id when no row of a batch truncates, by rank
    # otherwise: an untruncated row must not depend on which of the two its batch takes. One less
    # than SGLang's "no top-k" (1 << 30) keeps every token yet always sorts; without deterministic
    # mode seeds are not honoured and -1 (SGLang's faster unsorted sampler) is sent.
    s = SamplingParams(temperature=1.0)
    assert P.WHOLE_VOCAB_SORTED == (1 << 30) - 1
    assert P.sampling_params(s, max_new_tokens=4, sampling_seed=3, deterministic=True)["top_k"] == (1 << 30) - 1
    assert P.sampling_params(s, max_new_tokens=4, sampling_seed=None, deterministic=False)["top_k"] == -1
    assert P.sampling_params(SamplingParams(top_k=5), max_new_tokens=4, sampling_seed=3,
                             deterministic=True)["top_k"] == 5


def test_min_p_is_refused_in_deterministic_mode_and_passed_otherwise():
    s = SamplingParams(min_p=0.2)
    with pytest.raises(EngineError, match="min_p=0.2.*enable_deterministic_inference=False"):
        P.sampling_params(s, max_new_tokens=4, sampling_seed=1, deterministic=True)
    assert P.sampling_params(s, max_new_tokens=4, sampling_seed=None, deterministic=False)["min_p"] == 0.2


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=-1)])
def test_out_of_range_sampling_is_refused(bad):
    with pytest.raises(EngineError, match="bad sampling parameters"):
        P.sampling_params(SamplingParams(**bad), max_new_tokens=4, sampling_seed=None, deterministic=True)


def test_seeds_deterministic_mode_sends_them_and_invents_fresh_ones():
    rng = random.Random(0)
    assert P.resolve_seed(2**63 + 5, deterministic=True, allow_unseeded=False, rng=rng) == 5  # int64 range
    fresh = {P.resolve_seed(None, deterministic=True, allow_unseeded=False, rng=rng) for _ in range(4)}
    assert len(fresh) == 4 and all(0 <= s < 2**63 for s in fresh)


def test_seeds_without_deterministic_mode_are_refused_unless_allowed():
    rng = random.Random(0)
    with pytest.raises(EngineError, match="ignores per-request seeds.*allow_unseeded=True"):
        P.resolve_seed(3, deterministic=False, allow_unseeded=False, rng=rng)
    assert P.resolve_seed(3, deterministic=False, allow_unseeded=True, rng=rng) is None
    assert P.resolve_seed(None, deterministic=False, allow_unseeded=False, rng=rng) is None


def test_generate_request_has_generate_req_input_fields():
    req = P.generate_request([1, 2], {"max_new_tokens": 3}, "r1")
    assert req == {"rid": "r1", "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}, "return_logprob": True,
                   "logprob_start_len": -1, "stream": True}


def sglang_output(ids, lps, finish=None, cached=3, version="4"):
    """What SGLang's tokenizer manager yields (JSON turns the triples into lists)."""
    return {"output_ids": ids, "meta_info": {"id": "r", "finish_reason": finish, "prompt_tokens": 10,
                                             "weight_version": version, "completion_tokens": len(ids),
                                             "cached_tokens": cached,
                                             "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)]}}


def test_parse_chunk_reads_sglang_outputs():
    c = P.parse_chunk(sglang_output([5, 6], [-0.5, -1.25], {"type": "length", "length": 2}))
    assert c == P.Chunk((5, 6), (-0.5, -1.25), 2, {"type": "length", "length": 2}, 3, "4")


@pytest.mark.parametrize("out,match", [
    ({"error": {"message": "Input length exceeds"}}, "refused the request: Input length exceeds"),
    ({"output_ids": [1]}, "unexpected SGLang output"),
    ({"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [[-1.0, 1, None], [-1.0, 3, None]]}},
     "disagree with its output_ids"),
])
def test_parse_chunk_refuses_errors_and_other_shapes(out, match):
    with pytest.raises(EngineError, match=match):
        P.parse_chunk(out)


def test_progress_takes_cumulative_and_incremental_streams():
    cum = P.Progress([], [])
    assert cum.add(P.parse_chunk(sglang_output([1], [-1.0]))) == 1
    assert cum.add(P.parse_chunk(sglang_output([1, 2, 3], [-1.0, -2.0, -3.0]))) == 2
    inc = P.Progress([], [])
    inc.add(P.parse_chunk(sglang_output([1], [-1.0])))
    delta = sglang_output([2, 3], [-2.0, -3.0])
    delta["meta_info"]["completion_tokens"] = 3  # incremental: 3 so far, 2 of them in this chunk
    assert inc.add(P.parse_chunk(delta)) == 2
    assert cum.token_ids == inc.token_ids == [1, 2, 3] and cum.logprobs == inc.logprobs == [-1.0, -2.0, -3.0]
    # A streamed abort answered by SGLang's tokenizer manager repeats only the last id, with every
    # logprob so far: what came stays.
    assert inc.add(P.Chunk((3,), (-1.0, -2.0, -3.0), 3, {"type": "abort"}, None, None)) == 0
    assert inc.token_ids == [1, 2, 3]


@pytest.mark.parametrize("finish,expected", [
    ({"type": "stop", "matched": 7}, "stop"),
    ({"type": "stop", "matched": 2}, "continue"),  # the model's EOS, not asked for
    ({"type": "stop", "matched": "</s>"}, "stop"),
    ({"type": "length", "length": 4}, "length"),
    ({"type": "abort", "message": "Aborted"}, "abort"),
])
def test_finish_kind(finish, expected):
    assert P.finish_kind(finish, (7,)) == expected


def test_finish_kind_refuses_unknown_or_missing():
    with pytest.raises(EngineError, match="without a finish reason"):
        P.finish_kind(None, ())
    with pytest.raises(EngineError, match="unknown SGLang finish reason"):
        P.finish_kind({"type": "paused"}, ())


def test_stop_string_scanner_matches_full_decoding(tokenizer):
    """The windowed scan finds the same end as decoding the whole response prefix after each token."""
    rng = random.Random(0)
    for _ in range(30):
        tokens = [rng.randrange(3, len(tokenizer)) for _ in range(24)]
        stop = tokenizer.decode(tokens[rng.randrange(0, 20):][:rng.randrange(1, 4)], skip_special_tokens=False)
        if not stop:
            continue
        ref = next((k for k in range(1, 25) if stop in tokenizer.decode(tokens[:k], skip_special_tokens=False)), None)
        scanner = P.StopStringScanner(tokenizer, [stop])
        found = scanner.find(tokens[:10]) or scanner.find(tokens)  # in two chunks, as a stream gives them
        assert found == ref


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(EngineError, match="stop strings need the model's tokenizer"):
        P.StopStringScanner(None, ["x"])


def test_engine_arguments_map_agentrl_settings_and_pass_options():
    args = P.engine_arguments("/m", dtype=torch.float16, max_model_len=2048, device="cuda:3", seed=7,
                              options={"mem_fraction_static": 0.5})
    assert args == {"model_path": "/m", "skip_tokenizer_init": True, "dtype": "float16", "context_length": 2048,
                    "random_seed": 7, "device": "cuda", "weight_version": "0", "base_gpu_id": 3,
                    "enable_deterministic_inference": True, "mem_fraction_static": 0.5}
    off = P.engine_arguments("/m", dtype="bfloat16", max_model_len=8, device="cuda", seed=0,
                             options={"enable_deterministic_inference": False})
    assert off["enable_deterministic_inference"] is False and "base_gpu_id" not in off


@pytest.mark.parametrize("kw,match", [
    (dict(options={"context_length": 9}), "set by agentrl"),
    (dict(device="tpu"), "runs on cuda"),
    (dict(dtype=torch.int8), "has no SGLang name"),
])
def test_engine_arguments_refuse(kw, match):
    base = dict(dtype=torch.bfloat16, max_model_len=8, device="cuda", seed=0, options={})
    with pytest.raises(EngineError, match=match):
        P.engine_arguments("/m", **{**base, **kw})


def test_server_command_renders_flags_like_sglangs_parser():
    cmd = P.server_command({"model_path": "/m", "skip_tokenizer_init": True, "enable_memory_saver": False,
                            "base_gpu_id": 1, "cuda_graph_bs": [1, 2], "chunked_prefill_size": None},
                           python="/py")
    assert cmd(4242) == ["/py", "-m", "sglang.launch_server", "--model-path", "/m", "--skip-tokenizer-init",
                         "--base-gpu-id", "1", "--cuda-graph-bs", "1", "2", "--host", "127.0.0.1", "--port", "4242"]


def test_environment_that_changes_logprobs_is_refused():
    P.check_environment({"SGLANG_RETURN_ORIGINAL_LOGPROB": "0"})
    with pytest.raises(EngineError, match="Unset it"):
        P.check_environment({"SGLANG_RETURN_ORIGINAL_LOGPROB": "true"})


def test_weight_version_number():
    assert P.weight_version_number("12", 0) == 12
    assert P.weight_version_number("default", 3) == 3 and P.weight_version_number(None, 5) == 5
