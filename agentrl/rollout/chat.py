"""Chat rendering for token-in/token-out rollouts.

The conversation is rendered with the tokenizer's chat template exactly once, at the start. After
that only new tokens are appended: the model's tokens exactly as sampled, and each observation as
the suffix the template would add after an assistant turn. History is never re-tokenized, so the
tokens the trainer sees are the tokens the engine sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentrl.envs.core import Message
from agentrl.errors import ConfigError

# A fixed stand-in conversation: the observation suffix is what the template adds after it.
_BASE = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


class ChatRenderer:
    """Turns messages into token ids with a Hugging Face tokenizer's chat template.

    Args:
        tokenizer: A tokenizer with a chat template and an end-of-turn token.
        tools: OpenAI-style tool schemas rendered into the prompt.
        end_of_turn: The token that closes an assistant turn (default: the tokenizer's eos).
    """

    def __init__(self, tokenizer: Any, tools: Sequence[dict[str, Any]] = (), end_of_turn: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; agentrl renders conversations with it")
        self.tokenizer = tokenizer
        self.tools = list(tools) or None
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids([self.end_of_turn])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"end-of-turn token {self.end_of_turn!r} is not in the vocabulary")
        self.end_of_turn_id: int = ids[0]
        base = self.render(_BASE)
        cut = base.rfind(self.end_of_turn)
        if cut < 0:
            raise ConfigError(f"the chat template does not close assistant turns with {self.end_of_turn!r}")
        self._base_text = base
        self._after_turn = base[cut + len(self.end_of_turn):]  # e.g. the newline after <|im_end|>

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tools=self.tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The opening of an episode, ending with the assistant's generation prompt."""
        return self.encode(self.render([m.as_dict() for m in messages], add_generation_prompt=True))

    def observation_ids(self, messages: Sequence[Message]) -> list[int]:
        """Tokens that follow an assistant turn closed by `end_of_turn`: the new messages, then the
        next generation prompt."""
        full = self.render(_BASE + [m.as_dict() for m in messages], add_generation_prompt=True)
        if not full.startswith(self._base_text):
            raise ConfigError("the chat template re-renders earlier turns when messages are added; "
                              "token-in/token-out rollouts need an append-only template")
        return self.encode(self._after_turn + full[len(self._base_text):])

    def assistant_ids(self, text: str) -> list[int]:
        """A scripted assistant turn as the model would have sampled it (text, then end of turn)."""
        return self.encode(text) + [self.end_of_turn_id]

    def strip_end_of_turn(self, ids: Sequence[int]) -> list[int]:
        return list(ids[:-1]) if ids and ids[-1] == self.end_of_turn_id else list(ids)
