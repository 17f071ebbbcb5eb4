"""The engine contract: token ids in, token ids (with logprobs) out.

Every backend — the built-in PyTorch engine, SGLang, vLLM — implements `Engine`. Text never
crosses this boundary, so the tokens the trainer sees are exactly the tokens that were sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from agentrl.errors import EngineError
from agentrl.registry import Registry


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one response.

    `temperature=0` is greedy. Reported logprobs are those of the temperature-scaled distribution
    before top-k / top-p / min-p truncation (`log_softmax(logits / temperature)`; `temperature=0`
    uses 1), which is what the trainer recomputes. A stop token or the token that completes a stop
    string is the last token of the response (finish reason `stop`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    min_p: float = 0.0
    """Drop tokens less likely than `min_p` times the most likely one (0: off)."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded response (needs the engine's tokenizer)."""


@dataclass(frozen=True)
class Generation:
    """One response. `finish_reason` is `stop` (a stop token, included), `length` or `abort`.

    `weight_version` is the version of the weights that sampled the first token; an engine whose
    weights can change mid-response (an update between two decode steps) gives each token's version
    in `token_weight_versions` (empty: every token is `weight_version`'s).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    weight_version: int = 0
    prompt_cached_tokens: int = 0
    token_weight_versions: tuple[int, ...] = ()

    def versions(self) -> tuple[int, ...]:
        """The weight version that sampled each token, one per `token_ids`."""
        if len(self.token_weight_versions) == len(self.token_ids):
            return self.token_weight_versions
        return (self.weight_version,) * len(self.token_ids)


@runtime_checkable
class Engine(Protocol):
    """What the agent loop needs from an inference backend."""

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation: ...

    def update_weights(self, state_dict: Mapping[str, object], version: int) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def abort(self) -> None: ...


def check_prompt(prompt: Sequence[int], max_model_len: int, vocab_size: int | None) -> None:
    """Refuse a prompt no backend can serve (empty, too long, ids outside the vocabulary), with what to do."""
    if not prompt:
        raise EngineError("prompt_ids is empty; a request needs at least one token")
    if len(prompt) >= max_model_len:
        raise EngineError(f"prompt has {len(prompt)} tokens; max_model_len is {max_model_len}. "
                          "Shorten the prompt or raise max_model_len")
    if min(prompt) < 0 or (vocab_size is not None and max(prompt) >= vocab_size):
        raise EngineError(f"prompt token ids must be in [0, {vocab_size}); got min {min(prompt)}, max {max(prompt)}")


def load_tokenizer_or_none(path: str):
    """The tokenizer saved with the model at `path`, or None (then a backend refuses stop strings with
    a clear error instead of failing at load)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


@dataclass
class EngineStats:
    """Counters a backend keeps for metrics."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    batches: int = 0
    generate_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


ENGINES: Registry[type] = Registry("engine", group="agentrl.engines")
ENGINES.register("embedded", "agentrl.rollout.backends.embedded:EmbeddedEngine")
ENGINES.register("sglang", "agentrl.rollout.backends.sglang:SGLangEngine")
ENGINES.register("vllm", "agentrl.rollout.backends.vllm:VLLMEngine")
