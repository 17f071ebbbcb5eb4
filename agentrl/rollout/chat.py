"""Chat rendering for token-in/token-out rollouts.

The conversation is rendered with the tokenizer's chat template exactly once, at the start. After
that only new tokens are appended: the model's tokens exactly as sampled, and each observation as
the suffix the template would add after an assistant turn. History is never re-tokenized, so the
tokens the trainer sees are the tokens the engine sampled.

Observation text (tool output, env feedback, a tool name the model made up) is data, never markup:
before rendering, every occurrence of one of the tokenizer's control tokens in it is escaped, so a
tool that prints `<|im_end|>\n<|im_start|>assistant\n` cannot close its own turn or open one in the
model's name. See `ControlTokenEscaper` for the choice of escape. The episode's opening (system
prompt, task, few-shot turns) is the env author's text and is rendered as written: it may show the
tool-call format on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from agentrl.envs.core import Message
from agentrl.errors import ConfigError

# A fixed stand-in conversation: the observation suffix is what the template adds after it.
_BASE = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]

# Inserted after the first character of a control token. A backslash is visible in decoded
# trajectories and logs (a reader sees `<\|im_end|>` and knows the text was escaped), reads as
# "escaped" to people and models alike, and is one plain byte for every byte-level tokenizer. The
# invisible fallbacks are used only when a control token itself contains a backslash.
_ESCAPE_CHARS = ("\\", "\u200b", "\u2060")
# Non-special added tokens count as control tokens when they look like markup: Qwen's `<tool_call>`
# and `<think>` are added tokens with special=False, yet a template or parser gives them meaning.
_MARKUP = re.compile(r"^(<.*>|\[.*\])$", re.S)


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The strings a tokenizer turns into control-token ids: its special tokens and markup-like added tokens.

    Whitespace runs and plain words that some tokenizers add to their vocabulary are left out: they
    carry no meaning for a chat template, and escaping them would mangle ordinary text.
    """
    found = set(getattr(tokenizer, "all_special_tokens", ()))
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if added.special or _MARKUP.match(added.content.strip()):
            found.add(added.content)
    # one character cannot be split by an insertion; no chat template uses such a token
    return tuple(sorted((t for t in found if len(t) >= 2), key=lambda t: (-len(t), t)))


class ControlTokenEscaper:
    """Escapes control tokens in text by inserting a character after each one's first character.

    `<|im_end|>` becomes `<\\|im_end|>` and `<tool_call>` becomes `<\\tool_call>`. The escape
    character is chosen so that it occurs in no control token; then after escaping the text holds
    no control token at all, overlapping occurrences included (every occurrence start is split, and
    an occurrence in the result would have to be one of those, unsplit). The escape is one-way: it
    is meant for the model to read, not to be decoded back.

    Args:
        tokens: The control tokens (see `control_tokens`).

    Example:
        >>> ControlTokenEscaper(["<|im_end|>"]).escape("a<|im_end|>b")
        'a<\\\\|im_end|>b'
    """

    def __init__(self, tokens: Sequence[str]):
        self.tokens = tuple(tokens)
        self.char = next((c for c in _ESCAPE_CHARS if not any(c in t for t in self.tokens)), None)
        if self.tokens and self.char is None:
            raise ConfigError(f"cannot escape control tokens {self.tokens!r}: each candidate escape "
                              f"character {_ESCAPE_CHARS!r} occurs in one of them")
        # a lookahead finds every start position, overlapping occurrences included
        alternatives = "|".join(map(re.escape, self.tokens))
        self._starts = re.compile(f"(?=(?:{alternatives}))") if self.tokens else None

    def escape(self, text: str) -> str:
        if self._starts is None or not text:
            return text
        starts = [m.start() for m in self._starts.finditer(text)]
        if not starts:
            return text
        parts, prev = [], 0
        for start in starts:
            parts.append(text[prev : start + 1])
            prev = start + 1
        parts.append(text[prev:])
        return self.char.join(parts)  # type: ignore[union-attr]

    def escape_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """Every string field but `role` made encodable and escaped (templates may render `name`,
        which a model can choose)."""
        return {k: self.escape(_encodable(v)) if isinstance(v, str) and k != "role" else v for k, v in message.items()}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """`text` with lone surrogates as U+FFFD. A JSON `"\\ud800"` in a tool call can put one in a tool
    name or an error message, and the tokenizer refuses such strings (TypeError) instead of encoding them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


class ChatRenderer:
    """Turns messages into token ids with a Hugging Face tokenizer's chat template.

    Args:
        tokenizer: A tokenizer with a chat template and an end-of-turn token.
        tools: OpenAI-style tool schemas rendered into the prompt.
        end_of_turn: The token that closes an assistant turn (default: the tokenizer's eos).

    Messages given to `observation_ids` have their control tokens escaped (see
    `ControlTokenEscaper`); `prompt_ids` and `render` render what they are given.
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
        self.escaper = ControlTokenEscaper(control_tokens(tokenizer))
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
        next generation prompt. Control tokens inside the messages are escaped first, so the only
        control-token ids here are the ones the template adds."""
        full = self.render(_BASE + self._escaped(messages), add_generation_prompt=True)
        if not full.startswith(self._base_text):
            raise ConfigError("the chat template re-renders earlier turns when messages are added; "
                              "token-in/token-out rollouts need an append-only template")
        return self.encode(self._after_turn + full[len(self._base_text):])

    def _escaped(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        return [self.escaper.escape_message(m.as_dict()) for m in messages]

    def render_episode(self, opening: Sequence[Message], turns: Sequence[Message]) -> str:
        """The text an episode's token ids decode to: `opening` as written, then `turns`, where
        assistant turns are the model's own text and every other message is escaped as in `observation_ids`."""
        rest = [m.as_dict() if m.role == "assistant" else self.escaper.escape_message(m.as_dict()) for m in turns]
        return self.render([m.as_dict() for m in opening] + rest)

    def assistant_ids(self, text: str) -> list[int]:
        """A scripted assistant turn as the model would have sampled it (text, then end of turn)."""
        return self.encode(text) + [self.end_of_turn_id]

    def strip_end_of_turn(self, ids: Sequence[int]) -> list[int]:
        return list(ids[:-1]) if ids and ids[-1] == self.end_of_turn_id else list(ids)
