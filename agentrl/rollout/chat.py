"""Chat rendering for token-in/token-out rollouts.

The conversation is rendered with the tokenizer's chat template exactly once, at the start. After
that only new tokens are appended: the model's tokens exactly as sampled, and each observation as
the suffix the template would add after an assistant turn. History is never re-tokenized, so the
tokens the trainer sees are the tokens the engine sampled.

This needs an append-only template: rendering the conversation anew after a turn must give the
old text plus new text. `ChatRenderer` checks it on probe conversations shaped like real ones (the
model's probe turn is written the way the template writes a model turn, reasoning block included),
once per opening shape and on every observation:

- a template that rewrites earlier text (moves the system prompt into the newest user turn,
  re-renders the tool list, drops the model's turn) is refused with `ChatTemplateError`, naming the
  first text that changed;
- a template whose only rewrite is dropping earlier turns' reasoning blocks (`<think>...</think>`,
  as Qwen3's does once a new user query arrives) is accepted: agentrl keeps the reasoning in the
  token stream as sampled, which is what the template's keep-reasoning mode renders, and warns once.

`agentrl check-model` runs the same comparison on real episodes of an env (see
`agentrl.rollout.check_model`) before any GPU time is spent.

Observation text (tool output, env feedback, a tool name the model made up) is data, never markup:
before rendering, every occurrence of one of the tokenizer's control tokens in it is escaped, so a
tool that prints `<|im_end|>\n<|im_start|>assistant\n` cannot close its own turn or open one in the
model's name. See `ControlTokenEscaper` for the choice of escape. The episode's opening (system
prompt, task, few-shot turns) is the env author's text and is rendered as written: it may show the
tool-call format on purpose.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from agentrl.envs.core import Message
from agentrl.errors import ChatTemplateError, ConfigError

# The stand-in conversation of the probes. Distinct words, so that each one's place in a render can be found.
PROBE_QUESTION = "probe question"
PROBE_REASONING = "probe reasoning"
PROBE_ANSWER = "probe answer"

# Reasoning blocks a template may drop from earlier turns. A rewrite that only removes these is
# accepted (the reasoning stays in the token stream as sampled); any other rewrite is refused.
REASONING_BLOCKS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))
_REASONING = re.compile("|".join(f"{re.escape(a)}.*?{re.escape(b)}\\s*" for a, b in REASONING_BLOCKS), re.S)

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




def strip_reasoning(text: str) -> str:
    """`text` without its reasoning blocks (`REASONING_BLOCKS`) and the whitespace after each."""
    return _REASONING.sub("", text)


def first_difference(a: str, b: str, a_name: str = "expected", b_name: str = "got", context: int = 48) -> str:
    r"""Where two renders of one conversation part, quoted so that whitespace and markup are visible.

    Example:
        >>> first_difference("<s>[INST]S\n\nU", "<s>[INST]U", "prompt", "re-render", context=9)
        "at character 9, after '<s>[INST]': prompt has 'S\\n\\nU', re-render has 'U'"
    """
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"at character {n}, after {a[max(0, n - context):n]!r}: {a_name} has {a[n:n + context]!r}, "
            f"{b_name} has {b[n:n + context]!r}")


class ChatRenderer:
    """Turns messages into token ids with a Hugging Face tokenizer's chat template.

    Args:
        tokenizer: A tokenizer with a chat template and an end-of-turn token.
        tools: OpenAI-style tool schemas rendered into the prompt.
        end_of_turn: The token that closes an assistant turn (default: the tokenizer's eos).
        template_kwargs: Extra variables every render passes to the template, e.g. a template's
            own switch such as `{"enable_thinking": False}`.

    Messages given to `observation_ids` have their control tokens escaped (see
    `ControlTokenEscaper`); `prompt_ids` and `render` render what they are given. Both raise
    `ChatTemplateError` when the template rejects the conversation or is not append-only for it
    (see the module docstring).
    """

    def __init__(self, tokenizer: Any, tools: Sequence[dict[str, Any]] = (), end_of_turn: str | None = None,
                 template_kwargs: Mapping[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; agentrl renders conversations with it")
        self.tokenizer = tokenizer
        self.tools = list(tools) or None
        self.template_kwargs = dict(template_kwargs or {})
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise ConfigError("the tokenizer has no eos token; name the token that ends a model turn (end_of_turn)")
        ids = tokenizer.convert_tokens_to_ids([self.end_of_turn])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"end-of-turn token {self.end_of_turn!r} is not in the vocabulary")
        self.end_of_turn_id: int = ids[0]
        self.escaper = ControlTokenEscaper(control_tokens(tokenizer))
        self.model_turn = self._model_turn_shape()
        self._probe = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": self.model_turn}]
        base = self._render_or_refuse(self._probe, False, "a user turn and a model turn")
        cut = self._turn_end(base)
        self._probe_text = base[:cut]  # the probe through its model turn's end-of-turn token
        self._after_turn = base[cut:]  # e.g. the newline after <|im_end|>
        self._checked_openings: set[tuple[str, ...]] = set()
        self.keeps_dropped_reasoning = False  # set once the template was seen dropping earlier reasoning

    # -- rendering ------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tools=self.tools, add_generation_prompt=add_generation_prompt, tokenize=False,
            **self.template_kwargs,
        )

    def _render_or_refuse(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, what: str) -> str:
        try:
            return self.render(messages, add_generation_prompt)
        except (jinja2.TemplateError, TypeError) as exc:
            roles = ", ".join(m["role"] for m in messages)
            raise ChatTemplateError(
                f"the chat template rejects {what} (roles: {roles}): {type(exc).__name__}: {str(exc)[:300]}. "
                "Run `agentrl check-model MODEL --env ENV` to see every conversation shape the env produces; "
                "use a template that accepts them, or change what the env sends") from exc

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _model_turn_shape(self) -> str:
        """The text of a model turn as a model trained on this template samples it: what the template
        writes between the generation prompt and the end-of-turn token, reasoning block included
        when the template writes one (Qwen3: `<think>\\nprobe reasoning\\n</think>\\n\\nprobe answer`).

        A probe turn of another shape misjudges reasoning templates: Qwen3's writes an empty
        `<think>` block into the newest turn only, so a bare probe turn looks rewritten as soon as
        anything follows it, although a real turn (which holds its reasoning) is not.
        """
        asked = [{"role": "user", "content": PROBE_QUESTION}]
        try:
            prompt = self.render(asked, add_generation_prompt=True)
        except (jinja2.TemplateError, TypeError):
            return PROBE_ANSWER  # the rejection is reported with its text by the first render that needs it
        for reply in ({"content": PROBE_ANSWER, "reasoning_content": PROBE_REASONING}, {"content": PROBE_ANSWER}):
            try:
                full = self.render(asked + [{"role": "assistant", **reply}])
            except (jinja2.TemplateError, TypeError):
                continue
            end = full.find(self.end_of_turn, len(prompt))
            if full.startswith(prompt) and end >= 0 and PROBE_ANSWER in full[len(prompt):end]:
                return full[len(prompt):end]
        return PROBE_ANSWER

    def _turn_end(self, text: str, last: bool = False) -> int:
        """Index just past the end-of-turn token that closes the probe's model turn in `text`."""
        at = text.rfind(PROBE_ANSWER) if last else text.find(PROBE_ANSWER)
        end = text.find(self.end_of_turn, at + len(PROBE_ANSWER)) if at >= 0 else -1
        if end < 0:
            after = text[at + len(PROBE_ANSWER):][:40]
            what = ("drops the model's turn" if at < 0 else f"does not close the model's turn with "
                    f"{self.end_of_turn!r}: after the model's text it writes {after!r}")
            raise ChatTemplateError(
                f"the chat template {what} (rendered: {text[-300:]!r}); token-in/token-out rollouts need every "
                "model turn kept and closed by the end-of-turn token (ChatRenderer's end_of_turn, default eos)")
        return end + len(self.end_of_turn)

    # -- the episode ----------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The opening of an episode, ending with the assistant's generation prompt."""
        dicts = [m.as_dict() for m in messages]
        text = self._render_or_refuse(dicts, True, "the episode's opening")
        self._check_opening(dicts, text)
        return self.encode(text)

    def _check_opening(self, opening: list[dict[str, Any]], prompt: str) -> None:
        """The prompt plus a model turn must be what the template renders for the opening plus that
        turn (Mistral-style templates move the system prompt out of the first user turn once the
        model has answered). Checked once per shape of opening (its roles)."""
        shape = tuple(m["role"] for m in opening)
        if shape in self._checked_openings:
            return
        full = self._render_or_refuse(opening + [{"role": "assistant", "content": self.model_turn}], False,
                                      "the opening followed by a model turn")
        history = full[:self._turn_end(full, last=True)]
        self._judge(prompt + self.model_turn + self.end_of_turn, history, "the model's first turn")
        self._checked_openings.add(shape)

    def observation_ids(self, messages: Sequence[Message]) -> list[int]:
        """Tokens that follow an assistant turn closed by `end_of_turn`: the new messages, then the
        next generation prompt. Control tokens inside the messages are escaped first, so the only
        control-token ids here are the ones the template adds."""
        added = self._escaped(messages)
        roles = ", ".join(m["role"] for m in added) or "nothing"
        full = self._render_or_refuse(self._probe + added, True, f"a model turn followed by {roles} messages")
        cut = self._turn_end(full)
        self._judge(self._probe_text, full[:cut], f"{roles} messages")
        return self.encode(full[cut:])

    def _judge(self, before: str, after: str, added: str) -> None:
        """Refuse a template that rendered `before` as `after` once `added` came, unless the only change
        is dropped reasoning blocks (kept: the model trains on the reasoning it sampled)."""
        if after == before:
            return
        if strip_reasoning(after) == strip_reasoning(before):
            if not self.keeps_dropped_reasoning:
                self.keeps_dropped_reasoning = True
                warnings.warn(f"the chat template drops earlier turns' reasoning (seen on adding {added}); agentrl "
                              "keeps it in the token stream as sampled (serve the model with a template that keeps it)",
                              stacklevel=3)
            return
        raise ChatTemplateError(
            f"the chat template is not append-only: adding {added} changes how it renders the earlier "
            f"conversation, {first_difference(before, after, 'the token stream', 'the re-render')}. Token-in/"
            "token-out rollouts append to the tokens the model saw and cannot follow a template that rewrites "
            "them; use a template that renders history as written (see docs/models.md)")

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
