"""SGLang's request and response shapes, as pure functions (no sglang import, testable on a CPU).

Everything here was checked against the SGLang 0.5.17 source: `srt/sampling/sampling_params.py`
(the sampling fields), `srt/managers/io_struct.py` (`GenerateReqInput`), `srt/managers/
tokenizer_manager.py` (the output dict: `output_ids` and `meta_info` with `finish_reason`,
`cached_tokens`, `completion_tokens`, `weight_version` and `output_token_logprobs` as
`(logprob, token_id, text)` triples), `srt/managers/schedule_batch.py` (finish reasons
`{"type": "stop", "matched": id}`, `{"type": "length", ...}`, `{"type": "abort", ...}`; a stop
token is kept in `output_ids`), `srt/layers/sampler.py` (which logprobs come back) and
`srt/server_args.py` (engine arguments and their command-line flags).

What SGLang 0.5.17 returns as logprobs, and why agentrl can take them as they are: the sampler
divides the logits by the temperature, takes `softmax`, samples from (a truncated copy of) those
probabilities, and reports `log` of the untruncated probabilities; in deterministic mode it reports
`log_softmax(logits / T)` itself; a batch of greedy rows reports `log_softmax(logits)`. Greedy is
`temperature=1, top_k=1` inside SGLang, so its rows report T = 1. That is agentrl's contract
(`log_softmax(logits / T)` before top-k / top-p / min-p, T = 1 for greedy). The environment variable
`SGLANG_RETURN_ORIGINAL_LOGPROB=1` switches SGLang to `log_softmax(logits)` for every row, which
breaks the contract for any T != 1 and cannot be converted back from one number per token: the
backend refuses to start with it set.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.sampling import validate
from agentrl.rollout.engine import SamplingParams

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SEED_RANGE = 2**63  # SGLang keeps sampling seeds in an int64 tensor
STREAM_INTERVAL = 64  # tokens between two progress chunks of a request (the first token always comes at once)
STOP_STRING_STREAM_INTERVAL = 8  # finer for requests with stop strings: the client checks them per chunk
RETURN_ORIGINAL_LOGPROB = "SGLANG_RETURN_ORIGINAL_LOGPROB"
# SGLang 0.5.17 spells "no top-k" as 1 << 30; one less still keeps every token, but sends the row
# through the sorted (top-k/top-p) sampler, whatever else shares the batch (see `sampling_params`).
WHOLE_VOCAB_SORTED = (1 << 30) - 1


def dtype_name(dtype: torch.dtype | str) -> str:
    """SGLang's `dtype` argument for a torch dtype (or a name already)."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES.values():
            raise EngineError(f"dtype {dtype!r} is not one agentrl passes to SGLang; use one of "
                              f"{sorted(DTYPE_NAMES.values())}")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise EngineError(f"dtype {dtype} has no SGLang name; use torch.bfloat16, torch.float16 or torch.float32")
    return DTYPE_NAMES[dtype]


def resolve_seed(seed: int | None, *, deterministic: bool, allow_unseeded: bool,
                 rng: random.Random) -> int | None:
    """The `sampling_seed` to send for an agentrl seed.

    SGLang 0.5.17 honours `sampling_seed` only with `enable_deterministic_inference` (its sampler
    builds the seed tensor only then, giving unseeded requests the fixed seed 42). So: in
    deterministic mode a seeded request sends its seed and an unseeded one a fresh random seed (else
    every unseeded copy of a prompt would sample the same tokens); otherwise a seeded request is
    refused, unless `allow_unseeded` says to sample it without its seed.
    """
    if deterministic:
        return seed % SEED_RANGE if seed is not None else rng.randrange(SEED_RANGE)
    if seed is not None and not allow_unseeded:
        raise EngineError(
            "SamplingParams.seed is set, but this SGLang engine runs without enable_deterministic_inference, and "
            "SGLang 0.5.17 ignores per-request seeds then. Keep the default (enable_deterministic_inference=True), "
            "or pass allow_unseeded=True to sample seeded requests without their seed (not reproducible)")
    return None


def sampling_params(s: SamplingParams, *, max_new_tokens: int, sampling_seed: int | None,
                    deterministic: bool, stream_interval: int = STREAM_INTERVAL) -> dict[str, Any]:
    """SGLang's `sampling_params` dict for an agentrl request.

    Every field that could otherwise come from the model's `generation_config.json` (temperature,
    top-p/k, min-p, repetition penalty) is sent explicitly. Stop strings are not sent (the engine
    runs without a tokenizer): the client matches them (`StopStringScanner`). Without stop tokens,
    `ignore_eos` keeps SGLang from stopping at the model's own EOS ids; with stop tokens SGLang also
    stops at those EOS ids, and the client continues the response past one it did not ask for.

    Seeded sampling in SGLang 0.5.17 is batch-invariant only if a row always takes the same one of
    its two samplers (`srt/layers/sampler.py`): a batch in which no request has top-k, top-p or
    min-p draws Gumbel noise indexed by token id (`sampling_from_probs_torch`); any other batch,
    including one that merely shares a step with a greedy request (greedy is top_k=1 there), sorts
    every row's probabilities and indexes the noise by rank (`top_k_top_p_min_p_sampling_from_probs_torch`).
    Same seed, same position, different token. So in deterministic mode an untruncated request
    sends `top_k = WHOLE_VOCAB_SORTED` (every token kept) and always takes the sorted sampler. Its
    reported logprobs do not change (they come from `log_softmax(logits / T)` before sampling).

    Raises:
        EngineError: a parameter out of range, or min-p in deterministic mode (SGLang 0.5.17's
            seeded sampler asserts on min-p, which would kill its scheduler process).
    """
    validate(s)
    if s.min_p > 0 and deterministic:
        raise EngineError(
            f"min_p={s.min_p}: SGLang 0.5.17 cannot apply min-p when sampling is seeded "
            "(enable_deterministic_inference, the default here); use top_k / top_p, or start the engine with "
            "enable_deterministic_inference=False and allow_unseeded=True")
    params: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(s.temperature),  # 0 is greedy: SGLang makes it temperature 1, top_k 1
        "top_p": float(s.top_p),
        "top_k": int(s.top_k) if s.top_k > 0 else WHOLE_VOCAB_SORTED if deterministic else -1,
        "min_p": float(s.min_p),
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "min_new_tokens": 0,
        "n": 1,
        "ignore_eos": not s.stop_token_ids,
        "stream_interval": int(stream_interval),
    }
    if s.stop_token_ids:
        params["stop_token_ids"] = sorted({int(t) for t in s.stop_token_ids})
    if sampling_seed is not None:
        params["sampling_seed"] = int(sampling_seed)
    return params


def generate_request(prompt: Sequence[int], params: Mapping[str, Any], rid: str) -> dict[str, Any]:
    """`GenerateReqInput` fields for one streamed request: the JSON body of `/generate`, and the
    keyword arguments of `sglang.Engine.async_generate` (the same names)."""
    return {"rid": rid, "input_ids": [int(t) for t in prompt], "sampling_params": dict(params),
            "return_logprob": True, "logprob_start_len": -1, "stream": True}


@dataclass(frozen=True)
class Chunk:
    """One streamed output of a request (cumulative or incremental, see `Progress.add`)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    completion_tokens: int | None  # tokens generated so far, per SGLang; None when it did not say
    finish: Mapping[str, Any] | None  # None while the request runs
    cached_tokens: int | None
    weight_version: str | None


def parse_chunk(out: Mapping[str, Any]) -> Chunk:
    """Read one output dict of SGLang (`output_ids` + `meta_info`).

    Raises:
        EngineError: an error body, or a shape other than SGLang 0.5.17's.
    """
    if "error" in out:
        err = out["error"]
        raise EngineError(f"SGLang refused the request: {err.get('message', err) if isinstance(err, dict) else err}")
    try:
        meta = out["meta_info"]
        ids = tuple(int(t) for t in out["output_ids"])
        triples = meta.get("output_token_logprobs") or []
        lps = tuple(float(t[0]) for t in triples)
        lp_ids = tuple(int(t[1]) for t in triples)
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise EngineError(f"unexpected SGLang output (expected output_ids and meta_info with "
                          f"output_token_logprobs [logprob, token_id, text] triples): {_short(out)}") from exc
    if len(lp_ids) == len(ids) and lp_ids != ids:
        raise EngineError(f"SGLang's logprob token ids {lp_ids[:8]} disagree with its output_ids {ids[:8]}")
    finish = meta.get("finish_reason")
    return Chunk(ids, lps, _opt_int(meta.get("completion_tokens")), finish if isinstance(finish, Mapping) else None,
                 _opt_int(meta.get("cached_tokens")), None if meta.get("weight_version") is None
                 else str(meta["weight_version"]))


@dataclass
class Progress:
    """Tokens and logprobs of one request so far, from its stream of chunks.

    A server sends cumulative chunks (SGLang's default) or deltas (`--incremental-streaming-output`);
    `completion_tokens` tells them apart. A chunk that fits neither (an abort answered from the
    waiting queue repeats only the last id) leaves what was received.
    """

    token_ids: list[int]
    logprobs: list[float]
    chunks: int = 0

    def add(self, chunk: Chunk) -> int:
        """Take a chunk in; returns how many tokens it added."""
        self.chunks += 1
        before = len(self.token_ids)
        n = chunk.completion_tokens
        if n is None or len(chunk.token_ids) == n:
            ids, lps = list(chunk.token_ids), list(chunk.logprobs)
        elif before + len(chunk.token_ids) == n:
            ids, lps = self.token_ids + list(chunk.token_ids), self.logprobs + list(chunk.logprobs)
        else:
            return 0
        if len(ids) < before:
            return 0
        self.token_ids, self.logprobs = ids, lps if len(lps) == len(ids) else self.logprobs + lps[len(self.logprobs):]
        return len(self.token_ids) - before


def finish_kind(finish: Mapping[str, Any] | None, stop_token_ids: Sequence[int]) -> str:
    """agentrl's finish reason for SGLang's: `stop`, `length`, `abort`, or `continue` (SGLang
    stopped at one of the model's EOS ids that the request did not list: go on past it)."""
    if finish is None:
        raise EngineError("SGLang ended a request without a finish reason")
    kind = finish.get("type")
    if kind == "stop":
        matched = finish.get("matched")
        if isinstance(matched, int) and matched not in stop_token_ids:
            return "continue"
        return "stop"
    if kind in ("length", "abort"):
        return kind
    raise EngineError(f"unknown SGLang finish reason {dict(finish)!r}")


def weight_version_number(text: str | None, default: int) -> int:
    """agentrl's integer version from SGLang's `weight_version` string (`default` when not a number)."""
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


class StopStringScanner:
    """Finds where a response first contains one of `stops`, decoding only a window of tokens.

    The same rule as the built-in engine: after each token, the last `max(len(stop)) + 1` tokens
    of the response are decoded; the first token whose window contains a stop string ends the
    response (it is kept). Each token decodes to at least one character, so a stop string that
    ends at a token lies inside that window.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        if tokenizer is None:
            raise EngineError("stop strings need the model's tokenizer, and this SGLang engine has none: give a "
                              "model directory that includes one (or tokenizer=...), or stop on token ids")
        if any(not s for s in stops):
            raise EngineError(f"stop strings must be non-empty; got {list(stops)!r}")
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = max(len(s) for s in stops) + 1
        self.checked = 0  # response tokens already scanned

    def find(self, tokens: Sequence[int]) -> int | None:
        """The length of the response that ends at the first stop string, or None."""
        for k in range(self.checked + 1, len(tokens) + 1):
            text = self.tokenizer.decode(list(tokens[max(0, k - self.window):k]), skip_special_tokens=False)
            if any(s in text for s in self.stops):
                return k
        self.checked = len(tokens)
        return None


# -- starting an engine -------------------------------------------------------------------------

# Keyword arguments agentrl sets itself; an option naming one is refused (it would conflict).
OWN_ARGS = ("model_path", "skip_tokenizer_init", "dtype", "context_length", "random_seed", "device",
            "base_gpu_id", "host", "port", "weight_version")


def engine_arguments(model_path: str, *, dtype: torch.dtype | str, max_model_len: int, device: str, seed: int,
                     options: Mapping[str, Any]) -> dict[str, Any]:
    """The `sglang.Engine(**kwargs)` / `ServerArgs` fields for a backend: agentrl's plus `options`.

    `enable_deterministic_inference` defaults to True: it is what makes SGLang honour per-request
    seeds (and give the same tokens whatever else shares a batch).

    Raises:
        EngineError: an option agentrl sets itself, `skip_tokenizer_init=False`, or a device
            that is not cpu / cuda / cuda:N.
    """
    clash = [k for k in options if k in OWN_ARGS]
    if clash:
        raise EngineError(f"engine options {clash} are set by agentrl (from the model path, dtype, device, "
                          "max_model_len and seed): remove them from the options")
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "cpu") or (index and not index.isdigit()):
        raise EngineError(f"device {device!r}: the sglang backend runs on cuda, cuda:N (or cpu for SGLang's CPU "
                          "build)")
    args: dict[str, Any] = {"model_path": str(model_path), "skip_tokenizer_init": True, "dtype": dtype_name(dtype),
                            "context_length": int(max_model_len), "random_seed": int(seed), "device": kind,
                            "weight_version": "0"}
    if index:
        args["base_gpu_id"] = int(index)
    args["enable_deterministic_inference"] = True
    args.update(options)
    return args


def check_environment(env: Mapping[str, str]) -> None:
    """Refuse an environment in which SGLang would report logprobs other than agentrl's contract."""
    if env.get(RETURN_ORIGINAL_LOGPROB, "").strip().lower() in ("1", "true", "yes", "on"):
        raise EngineError(f"{RETURN_ORIGINAL_LOGPROB} is set: SGLang would report log_softmax(logits) without "
                          "the temperature, and agentrl's trainer recomputes log_softmax(logits / T). Unset it")


def server_command(args: Mapping[str, Any], *, python: str) -> Callable[[int], list[str]]:
    """The `python -m sglang.launch_server ...` command line for engine arguments, by port.

    Each `ServerArgs` field becomes `--field-name value` (underscores to dashes, as SGLang's
    parser derives them); True becomes the bare flag, False and None are left out (the defaults of
    SGLang's boolean flags are False), a list gives one value after another.
    """
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]

    def command(port: int) -> list[str]:
        return [python, "-m", "sglang.launch_server", *flags, "--host", "127.0.0.1", "--port", str(port)]
    return command


def environment_with(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a launched server sees (this process's plus `extra`)."""
    return {**os.environ, **extra}


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _short(out: Any, limit: int = 300) -> str:
    text = repr(out)
    return text if len(text) <= limit else text[:limit] + "..."
