"""Which engine a run uses (`rollout.engine`), and the keyword arguments its constructor gets.

`auto` picks the built-in engine when it runs the model's architecture exactly (the same check the
engine makes at load, from the config alone: the architecture table, every config option, the
weights' names, on the meta device, so no weight is read), else SGLang when it is installed, else
vLLM, else it refuses, naming the extra to install. A name given explicitly is taken as it is, but
SGLang and vLLM must be installed: that is checked here, before any model is loaded, without
importing them (only their backend modules ever do).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

from agentrl.errors import ConfigError, EngineError, did_you_mean
from agentrl.rollout.backends.managed import ServerSpec

#: Engines that need a package of their own: engine name -> (import name, pip extra).
PACKAGES = {"sglang": ("sglang", "sglang"), "vllm": ("vllm", "vllm")}

#: What `auto` tries after the built-in engine, in order.
FALLBACKS = ("sglang", "vllm")

#: Constructor arguments the driver sets from the config (model.*, rollout.*); never engine options.
DRIVER_SET = ("model", "model_path", "device", "dtype", "max_model_len", "server", "tokenizer")


def installed(name: str) -> bool:
    """Whether the package engine `name` needs is importable (found on sys.path; not imported)."""
    module = PACKAGES[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a broken sys.modules entry
        return False


def install_hint(name: str) -> str:
    return f"pip install 'agentrl[{PACKAGES[name][1]}]'"


def embedded_refusal(model_path: str, max_model_len: int | None = None) -> str | None:
    """Why the built-in engine would refuse the model in `model_path`, or None when it runs it.

    Reads config.json only. Errors reading it (not a model directory) propagate.
    """
    from transformers import AutoConfig

    from agentrl.rollout.backends.embedded.architectures import USE_INSTEAD
    from agentrl.rollout.backends.embedded.model_weights import check_architecture

    try:
        check_architecture(AutoConfig.from_pretrained(model_path), max_model_len)
    except EngineError as exc:
        return str(exc).replace(f"; {USE_INSTEAD}", "")  # the caller says what to use instead
    return None


def resolve_engine(name: str, model_path: str, max_model_len: int | None = None) -> str:
    """The engine to run: `name`, or for `auto` the first of embedded / sglang / vllm that can run the model.

    Args:
        name: `rollout.engine` (`auto`, `embedded`, `sglang`, `vllm`, or another registered name).
        model_path: The model directory (only its config.json is read, and only for `auto`).
        max_model_len: Longest prompt + response the engine will be asked for (a few rope types are
            supported only below a length).

    Raises:
        ConfigError: sglang or vllm named but not installed; or `auto` and nothing can run the model.

    Example:
        >>> resolve_engine("auto", "runs/tiny-model")  # doctest: +SKIP
        'embedded'
    """
    if name in PACKAGES:
        if not installed(name):
            raise ConfigError(f"rollout.engine={name} but the {PACKAGES[name][0]} package is not installed in this "
                              f"Python environment: {install_hint(name)} (or rollout.engine=auto to use the built-in "
                              "engine where it runs the model)")
        return name
    if name != "auto":
        return name
    refusal = embedded_refusal(model_path, max_model_len)
    if refusal is None:
        return "embedded"
    for fallback in FALLBACKS:
        if installed(fallback):
            return fallback
    raise ConfigError(f"rollout.engine=auto: {refusal}, and neither SGLang nor vLLM is installed "
                      f"to run it instead: {install_hint('sglang')} (or {install_hint('vllm')}), or use a model "
                      "the built-in engine runs (docs/architectures.md)")


def engine_arguments(engine: type, name: str, server: ServerSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments beyond (model, device, dtype, max_model_len) that `engine`'s constructor gets.

    `server` goes only to an engine whose constructor names it (sglang, vllm); `options`
    (`rollout.engine_options`) only as keywords the constructor names, unless it takes `**options`
    (then the backend checks them).

    Raises:
        ConfigError: an option the constructor does not take, one the driver sets itself, or a
            server (url or launch) for an engine that runs only in-process.
    """
    params = inspect.signature(engine).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [p for p, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key in DRIVER_SET:
            raise ConfigError(f"rollout.engine_options.{key}: agentrl sets {key} itself (from model.path, "
                              "model.device, model.dtype, rollout.max_total_tokens, rollout.server); remove it here")
        if key not in named and not takes_any:
            accepted = [p for p in named if p not in DRIVER_SET]
            raise ConfigError(f"rollout.engine_options.{key}: the {name} engine takes no option {key!r}."
                              f"{did_you_mean(key, accepted)} It takes: {', '.join(accepted) or 'none'}")
    kwargs = dict(options)
    if "server" in params:
        kwargs["server"] = server
    elif server.mode != "in_process":
        raise ConfigError(f"rollout.server ({'url' if server.mode == 'url' else 'launch'}) is for engines that run "
                          f"as servers (sglang, vllm); the {name} engine runs inside this process: remove "
                          "rollout.server, or set rollout.engine to sglang or vllm")
    return kwargs
