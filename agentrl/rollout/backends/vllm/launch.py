"""The vLLM engine's configuration, as `AsyncEngineArgs` keywords (in-process) and as the command
line of its OpenAI-compatible server: pure functions, testable without vLLM.

agentrl always sets what its contract needs: token ids in and out (`skip_tokenizer_init`),
prefix caching on, `logprobs_mode` (see `params.py`), sleep mode (for colocation with the
trainer). Every other `rollout.engine_options` key goes to vLLM unchanged (`gpu_memory_utilization`,
`enforce_eager`, `tensor_parallel_size`, ...); the few keys below are the backend's own.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from agentrl.errors import EngineError, did_you_mean
from agentrl.rollout.backends.vllm.params import LOGPROBS_MODES

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SERVER_MODULE = ("-m", "vllm.entrypoints.openai.api_server")
WEIGHT_SYNCS = ("disk", "nccl")


@dataclass(frozen=True)
class BackendOptions:
    """The `engine_options` the vllm backend reads itself; the rest are vLLM engine arguments.

    Attributes:
        logprobs_mode: vLLM's `logprobs_mode`, `processed_logprobs` (default) or `raw_logprobs`
            (see `params.py` for which requests each can serve).
        enable_sleep_mode: Start vLLM with sleep mode (needed by `sleep()`/`wake()`).
        weight_sync: `disk` (default) or `nccl` (server mode; not run on this project's machines).
        staging_dir: Where `update_weights` writes the weights for vLLM to load (default: the temp
            dir); a launched or remote server must be able to read it.
        launcher: The server command before its arguments (default: this Python with
            `-m vllm.entrypoints.openai.api_server`); e.g. `["vllm", "serve"]`.
        request_timeout_s: Longest wait for one HTTP call to the server (a generation included).
        nccl_master_address: The address the server's workers reach agentrl's process at (nccl).
        nccl_master_port: The port of that rendezvous (nccl; default: a free port).
    """

    logprobs_mode: str = "processed_logprobs"
    enable_sleep_mode: bool = True
    weight_sync: str = "disk"
    staging_dir: str | None = None
    launcher: tuple[str, ...] = (sys.executable, *SERVER_MODULE)
    request_timeout_s: float = 3600.0
    nccl_master_address: str = "127.0.0.1"
    nccl_master_port: int | None = None

    @classmethod
    def split(cls, options: Mapping[str, object]) -> tuple[BackendOptions, dict[str, object]]:
        """(the backend's own options, the vLLM engine arguments) from `engine_options`."""
        own = {f.name for f in fields(cls)}
        mine = {k: v for k, v in options.items() if k in own}
        if "launcher" in mine:  # a list of words, or one string (split as a shell would)
            words = mine["launcher"]
            mine["launcher"] = tuple(shlex.split(words) if isinstance(words, str) else (str(w) for w in words))
        opts = cls(**mine)  # type: ignore[arg-type]
        if opts.logprobs_mode not in LOGPROBS_MODES:
            raise EngineError(f"engine option logprobs_mode={opts.logprobs_mode!r}: the vllm backend supports "
                              f"{LOGPROBS_MODES}")
        if opts.weight_sync not in WEIGHT_SYNCS:
            raise EngineError(f"engine option weight_sync={opts.weight_sync!r}: expected one of {WEIGHT_SYNCS}."
                              f"{did_you_mean(opts.weight_sync, WEIGHT_SYNCS)}")
        return opts, {k: v for k, v in options.items() if k not in own}


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise EngineError(f"dtype {dtype} is not one vLLM loads weights in; use one of {sorted(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[dtype]


def engine_kwargs(model: str, dtype: torch.dtype | str, max_model_len: int, opts: BackendOptions,
                  passthrough: Mapping[str, object]) -> dict[str, object]:
    """`AsyncEngineArgs(**engine_kwargs(...))` for the in-process engine."""
    return {
        "model": model, "dtype": dtype_name(dtype), "max_model_len": max_model_len,
        "skip_tokenizer_init": True, "enable_prefix_caching": True, "logprobs_mode": opts.logprobs_mode,
        "enable_sleep_mode": opts.enable_sleep_mode,
        **({"weight_transfer_config": {"backend": "nccl"}} if opts.weight_sync == "nccl" else {}),
        **passthrough,
    }


def check_engine_kwargs(kwargs: Mapping[str, object], known: set[str]) -> None:
    """Refuse keys that are not fields of vLLM's `AsyncEngineArgs` (`known`), naming the closest one."""
    for key in kwargs:
        if key not in known:
            raise EngineError(f"rollout.engine_options has {key!r}, which is neither a vllm backend option nor a "
                              f"vLLM engine argument.{did_you_mean(key, known)}")


def cli_flags(kwargs: Mapping[str, object]) -> list[str]:
    """vLLM engine arguments as command-line flags: `True` -> `--name`, `False` -> `--no-name`,
    dicts and lists as JSON (how vLLM's parser reads them), `None` left out."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list, tuple)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def server_argv(port: int, kwargs: Mapping[str, object], opts: BackendOptions) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server on 127.0.0.1:`port`.

    `--enable-prompt-tokens-details` makes the server report each request's prefix-cache hit;
    `--disable-uvicorn-access-log` keeps one log line per request out of the run's server log.
    """
    return [*opts.launcher, *cli_flags(kwargs), "--host", "127.0.0.1", "--port", str(port),
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]


SERVER_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",  # /sleep, /wake_up, /reset_prefix_cache, /pause, /collective_rpc
}
