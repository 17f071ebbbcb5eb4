"""agentrl's sampling contract in vLLM 0.24's terms: pure functions, testable without vLLM.

What vLLM 0.24 reports as a token's logprob is set engine-wide by `logprobs_mode` (read in
`vllm/v1/sample/sampler.py` and `vllm/v1/sample/ops/topk_topp_sampler.py` of the 0.24 wheel):

- `raw_logprobs` (vLLM's default): `log_softmax(logits)` of the model's logits before anything
  else, so before the temperature: at `T != 1` it is not agentrl's number.
- `processed_logprobs`: `log_softmax` of the logits the token was drawn from, after the
  temperature, min-p, top-k and top-p (tokens cut by those are -inf and the rest renormalised).
  Greedy rows report `log_softmax(logits)`, temperature 1.

agentrl's contract (`SamplingParams`) is `log_softmax(logits / T)` before truncation (`T = 0`
reports `T = 1`). `processed_logprobs` gives exactly that whenever nothing is truncated, so it is
the backend's default; `raw_logprobs` gives it at `T` in {0, 1}, truncated or not. No mode gives
it for a truncated draw at another temperature (only a full-vocabulary `logprobs=-1` would, at
the cost of a vocabulary-sized dict per token), so `check_logprob_contract` refuses those
requests instead of returning numbers the trainer would misread.

Stop strings never reach vLLM: it matches them on detokenized text and the engine runs with
`skip_tokenizer_init`; the backend matches them itself on the token stream. Stop tokens do:
vLLM keeps the stop token in `token_ids` (as agentrl's contract does), and `ignore_eos=True`
keeps the model's own EOS from ending a response that agentrl did not ask to stop there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agentrl.errors import EngineError
from agentrl.rollout.engine import SamplingParams

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
MAX_TEMPERATURE = 2.0  # vLLM 0.24 refuses temperature > 2 (SamplingParams._verify_args)
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def truncates(sampling: SamplingParams) -> bool:
    """Whether a sampled (T > 0) request cuts the distribution (top-k, top-p or min-p)."""
    return sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1 or sampling.min_p > 0)


def check_logprob_contract(sampling: SamplingParams, logprobs_mode: str) -> None:
    """Raise EngineError when vLLM in `logprobs_mode` cannot report this request's logprobs as agentrl
    defines them (see the module docstring), or when vLLM would refuse the request itself."""
    if logprobs_mode not in LOGPROBS_MODES:
        raise EngineError(f"logprobs_mode={logprobs_mode!r} is not supported by the vllm backend; use one of "
                          f"{LOGPROBS_MODES} (the logit modes report logits, not logprobs)")
    t = sampling.temperature
    if math.isfinite(t) and t > MAX_TEMPERATURE:
        raise EngineError(f"temperature={t} is above vLLM's limit of {MAX_TEMPERATURE}; lower it, or use the "
                          "embedded engine")
    if logprobs_mode == "processed_logprobs" and truncates(sampling):
        raise EngineError(
            f"vLLM reports logprobs after top-k/top-p/min-p truncation (logprobs_mode=processed_logprobs), and "
            f"agentrl's contract is the untruncated log_softmax(logits / T); got temperature={t}, "
            f"top_k={sampling.top_k}, top_p={sampling.top_p}, min_p={sampling.min_p}. Sample without truncation "
            "(top_k=0, top_p=1, min_p=0), or at temperature 1 with engine option logprobs_mode='raw_logprobs', "
            "or use the embedded or sglang engine")
    if logprobs_mode == "raw_logprobs" and t not in (0, 1):
        raise EngineError(
            f"with logprobs_mode=raw_logprobs vLLM reports log_softmax(logits) before the temperature, and "
            f"agentrl's contract is log_softmax(logits / T); got temperature={t}. Use temperature 0 or 1, or the "
            "default logprobs_mode='processed_logprobs' (then without top-k/top-p/min-p)")


def vllm_sampling_kwargs(sampling: SamplingParams) -> dict:
    """Keyword arguments for `vllm.SamplingParams` (in-process) for one agentrl request.

    Returns plain values; the caller adds `output_kind`. `logprobs=0` asks for the sampled token's
    logprob only; `detokenize=False` because the engine has no tokenizer.
    """
    return dict(
        n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
        seed=sampling.seed, max_tokens=sampling.max_tokens, stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=True, logprobs=0, detokenize=False, skip_special_tokens=False,
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
    )


def completion_body(prompt: list[int], sampling: SamplingParams) -> dict:
    """The JSON body of a streamed `/v1/completions` request (vLLM 0.24's `CompletionRequest`).

    Every sampling field is sent explicitly: for a field left out, vLLM's server takes the model's
    `generation_config.json` default (`default_sampling_params`), not agentrl's. `return_token_ids`
    puts the sampled ids in each chunk; `return_tokens_as_token_ids` keeps the logprob entries from
    needing a tokenizer (the server runs with `--skip-tokenizer-init`); `include_usage` adds a last
    chunk whose `usage.prompt_tokens_details.cached_tokens` is the prefix-cache hit (when the server
    runs with `--enable-prompt-tokens-details`).
    """
    body = dict(
        prompt=list(prompt), max_tokens=sampling.max_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
        stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True, logprobs=0,
        return_token_ids=True, return_tokens_as_token_ids=True, skip_special_tokens=False,
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
        stream=True, stream_options={"include_usage": True},
    )
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    return body


@dataclass(frozen=True)
class Delta:
    """What one streamed step added to a response.

    `finish_reason` is agentrl's (`stop`, `length`, `abort`) once the response ended, else None;
    `cached_tokens` is the prompt's prefix-cache hit where the step reports it, else None.
    """

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    cached_tokens: int | None = None


def finish_reason(reason: str | None) -> str | None:
    """vLLM's finish reason in agentrl's words; an `error` (or unknown) reason raises EngineError."""
    if reason is None:
        return None
    if reason in FINISH_REASONS:
        return FINISH_REASONS[reason]
    raise EngineError(f"vLLM ended the request with finish_reason={reason!r} (an internal error on its side; "
                      "see the server's log)")


def parse_completion_chunk(chunk: dict) -> Delta:
    """One `data:` object of vLLM's streamed `/v1/completions` response as a Delta.

    A chunk is a `CompletionStreamResponse`: `choices[0]` holds the new `token_ids`,
    `logprobs.token_logprobs` (one per new token) and `finish_reason`; the last chunk (asked for
    with `include_usage`) has no choices and a `usage`. An `error` object raises EngineError with
    the server's text.
    """
    if "error" in chunk:
        err = chunk["error"]
        text = err.get("message", err) if isinstance(err, dict) else err
        raise EngineError(f"vLLM server error during generation: {text}")
    cached = None
    usage = chunk.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        cached = int(details["cached_tokens"])
    choices = chunk.get("choices") or []
    if not choices:
        return Delta(cached_tokens=cached)
    choice = choices[0]
    ids = tuple(int(t) for t in choice.get("token_ids") or ())
    lps = tuple(float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or ()))
    if len(lps) != len(ids):
        raise EngineError(f"vLLM sent {len(ids)} token ids but {len(lps)} logprobs in one chunk; the backend "
                          "needs logprobs=0 to be honoured (is this a vLLM OpenAI-compatible server?)")
    return Delta(ids, lps, finish_reason(choice.get("finish_reason")), cached)


def error_text(status: int, body: bytes) -> str:
    """The message of a vLLM error response (`{"error": {"message": ...}}`, every handler of 0.24's
    server answers so), else the start of the raw body."""
    import json

    try:
        err = json.loads(body).get("error")
        return f"HTTP {status}: {err['message'] if isinstance(err, dict) else err}"
    except (ValueError, AttributeError, KeyError, TypeError):
        return f"HTTP {status}: {body[:2000].decode('utf-8', 'replace')}"
