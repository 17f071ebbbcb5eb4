"""Scripted episodes in a chat template's own format, for `check_model`.

A scripted model turn is reasoning, text and tool calls. `TurnWriter` writes it the way a model
trained on the template samples it: the template renders the conversation with the turn appended,
and the text between the generation prompt and the end-of-turn token is the sampled turn. Calls go
in `tool_calls` when the template writes them from there (Qwen3's, Mistral's), else into the text
in the parser's format (`CALL_WRITERS`), as for a template that renders `content` only.

`play_episode` then plays the env exactly as the agent loop does (`prompt_ids`, sampled ids,
`observation_ids`) and, before every model turn and at the end, compares the token ids with a full
re-render of the conversation, whose model turns are the structured messages, so that the template
renders them in its own format as a serving stack that re-renders history would.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrl.errors import ChatTemplateError
from agentrl.rollout.chat import PROBE_QUESTION, ChatRenderer, first_difference, strip_reasoning
from agentrl.tools.core import call_id

MAX_TURNS = 4
_PROBE_TOOL = "probe_tool"

Calls = Sequence[tuple[str, dict[str, Any]]]


def _hermes(calls: Calls) -> str:
    return "".join("<tool_call>" + json.dumps({"name": n, "arguments": a}) + "</tool_call>" for n, a in calls)


def _llama3_json(calls: Calls) -> str:
    return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


def _mistral(calls: Calls) -> str:
    return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def _qwen3_coder(calls: Calls) -> str:
    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    return "".join(f"<tool_call><function={n}>"
                   + "".join(f"<parameter={k}>\n{value(v)}\n</parameter>" for k, v in a.items())
                   + "</function></tool_call>" for n, a in calls)


#: How a model writes calls as text, per parser (used when the template writes no `tool_calls`).
CALL_WRITERS: dict[str, Callable[[Calls], str]] = {
    "hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral, "qwen3_coder": _qwen3_coder,
}


@dataclass(frozen=True)
class ScriptedTurn:
    """One model turn of the script, before any format is applied."""

    content: str
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    reasoning: str = ""


def probe_call_turn() -> ScriptedTurn:
    """A turn with two calls and nested arguments, for the parser round trip."""
    return ScriptedTurn("", (("lookup", {"query": "capital of France", "limit": 3}),
                             ("convert", {"value": 2.5, "units": ["km", "mi"], "exact": True})), "Two lookups.")


class TurnWriter:
    """Writes scripted turns the way a model trained on the renderer's template would sample them."""

    def __init__(self, renderer: ChatRenderer, parser: str):
        self.renderer = renderer
        self.write_calls = CALL_WRITERS.get(parser)
        probe = self._probe_render()
        self.structured = _PROBE_TOOL in probe
        self.writes_ids = self.structured and call_id(0) in probe

    def _probe_render(self) -> str:
        msg = {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id(0), "type": "function", "function": {"name": _PROBE_TOOL, "arguments": {"x": 1}}}]}
        try:
            return self.renderer.render([{"role": "user", "content": PROBE_QUESTION}, msg])
        except Exception:  # noqa: BLE001 - a template that refuses structured calls writes them as text
            return ""

    def message(self, turn: ScriptedTurn, ids: Sequence[str]) -> dict[str, Any]:
        """The structured assistant message of `turn`; `ids` are its calls' ids."""
        msg: dict[str, Any] = {"role": "assistant", "content": turn.content}
        if turn.reasoning:
            msg["reasoning_content"] = turn.reasoning
        if turn.calls and self.structured:
            msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                 for (n, a), i in zip(turn.calls, ids)]
        elif turn.calls and self.write_calls is not None:
            msg["content"] = (turn.content + "\n" if turn.content else "") + self.write_calls(turn.calls)
        # else: no way to write the calls in this parser's format; the tool-call format row says so
        return msg

    def sampled_text(self, history: list[dict[str, Any]], msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """What the model samples for `msg` after `history` (end-of-turn token excluded), and the message
        that renders as it: without its reasoning when the generation prompt pre-fills the reasoning block."""
        r = self.renderer
        prompt = r.render(history, add_generation_prompt=True)
        plain = {k: v for k, v in msg.items() if k != "reasoning_content"}
        for candidate in (msg, plain):
            full = r.render(history + [candidate])
            end = full.find(r.end_of_turn, len(prompt))
            if full.startswith(prompt) and end >= 0:
                return full[len(prompt):end], candidate
        # the template rewrote the prompt; the append-only row reports that
        return msg["content"] or self.text_form(msg), msg

    def text_form(self, msg: dict[str, Any]) -> str:
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", ())]
        return msg["content"] + (self.write_calls(calls) if calls and self.write_calls else "")


@dataclass
class EpisodeRecord:
    """What one scripted episode showed."""

    seed: int
    turns: int = 0
    calls: int = 0
    tool_errors: Counter = field(default_factory=Counter)
    env_error: str | None = None
    refused: str | None = None  # the ChatTemplateError the agent loop would stop on
    difference: tuple[str, str] | None = None  # ("fail" | "warn", first difference) against a re-render
    ids_missing: str | None = None
    ids_mismatch: str | None = None


def play_episode(env: Any, renderer: ChatRenderer, writer: TurnWriter, demo_parse: Any, seed: int) -> EpisodeRecord:
    """Play one scripted episode as the agent loop would, comparing ids with a full re-render each turn."""
    rec = EpisodeRecord(seed)
    rng = random.Random(seed)
    try:
        obs, _ = env.reset(seed=seed, options={"split": env.splits[0]})
        history = [m.as_dict() for m in obs]
        ids = renderer.prompt_ids(list(obs))
        numbered, last_output, ended = 0, None, False
        for k in range(MAX_TURNS):
            _compare(rec, renderer, ids, history, k, True)
            turn = script_turn(env, k, rng, last_output, demo_parse)
            id_of = getattr(env, "tool_call_id", call_id)
            call_ids = [id_of(numbered + i) or call_id(numbered + i) for i in range(len(turn.calls))]
            text, msg = writer.sampled_text(history, writer.message(turn, call_ids))
            ids += renderer.assistant_ids(text)
            history.append(msg)
            rec.turns += 1
            obs, _, terminated, truncated, info = env.step(text)
            rec.calls += int(info.get("tool_calls", 0))
            numbered += int(info.get("tool_calls", 0))
            rec.tool_errors.update(info.get("tool_errors", {}))
            ended = terminated or truncated
            if ended:
                break
            _check_ids(rec, k, call_ids if writer.structured else None, obs)
            ids += renderer.observation_ids(obs)
            history += [renderer.escaper.escape_message(m.as_dict()) for m in obs]
            last_output = last_output or next((m.content for m in obs if m.role == "tool"), None)
        _compare(rec, renderer, ids, history, rec.turns, not ended)  # ids end with a generation prompt unless ended
    except ChatTemplateError as exc:
        rec.refused = f"turn {rec.turns}: {exc}"
    except Exception as exc:  # noqa: BLE001 - the report names it
        rec.env_error = f"turn {rec.turns}: {type(exc).__name__}: {str(exc)[:300]}"
    return rec


def _compare(rec: EpisodeRecord, renderer: ChatRenderer, ids: list[int], history: list[dict[str, Any]],
             turn: int, generation_prompt: bool) -> None:
    """Record the first place where `ids` and a full re-render of `history` part."""
    if rec.difference is not None:
        return
    try:
        ref_text = renderer.render(history, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - the template's complaint is the finding
        rec.difference = ("fail", f"before turn {turn}, a re-render of the conversation fails: "
                                  f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    ref = renderer.encode(ref_text)
    if not generation_prompt:
        ref = ref[:len(ids)]  # the re-render may go on after the last end-of-turn token (a newline)
    if ref == ids:
        return
    got, want = renderer.decode(ids), renderer.decode(ref)
    where = f"before turn {turn}" if generation_prompt else "after the last turn"
    if got == want:
        at = next(i for i, (a, b) in enumerate(zip(ids + [-1], ref + [-1])) if a != b)
        rec.difference = ("warn", f"{where}, the text is the same but the tokens part at token {at} "
                                  f"({renderer.decode(ids[at:at + 3])!r} vs {renderer.decode(ref[at:at + 3])!r})")
    else:
        status = "warn" if strip_reasoning(got) == strip_reasoning(want) else "fail"
        rec.difference = (status, f"{where}, {first_difference(got, want, 'the token stream', 'a re-render')}")


def _check_ids(rec: EpisodeRecord, turn: int, call_ids: list[str] | None, obs: Sequence[Any]) -> None:
    tool_ids = [m.tool_call_id for m in obs if m.role == "tool"]
    if rec.ids_missing is None and tool_ids and not all(tool_ids):
        rec.ids_missing = f"turn {turn}: tool_call_id {tool_ids}"
    if rec.ids_mismatch is None and call_ids is not None and all(tool_ids) and tool_ids[:len(call_ids)] != call_ids:
        rec.ids_mismatch = (f"turn {turn}: the model's calls have ids {call_ids} but the env's tool messages "
                            f"answer {tool_ids}")


def script_turn(env: Any, k: int, rng: random.Random, last_output: str | None, demo_parse: Any) -> ScriptedTurn:
    """Turn `k` of the script: a call (the env's demonstrator's when it has one), then an unknown tool
    and invalid arguments in one turn (tool errors), then an answer."""
    reasoning = f"Step {k + 1}: choose the next action."
    schemas = [s.get("function", s) for s in env.tool_schemas()]
    if schemas and k == 0:
        return ScriptedTurn("", tuple(_demonstrated_calls(env, rng, demo_parse) or [_plausible_call(schemas[0])]),
                            reasoning)
    if schemas and k == 1:
        name, args = _plausible_call(schemas[0])
        wrong = {key: {"unexpected": [None]} for key in args} or {"unexpected": 1}
        return ScriptedTurn("Two calls at once.", (("no_such_tool", {"query": "x"}), (name, wrong)), reasoning)
    return ScriptedTurn(_demonstrated_answer(env, rng, last_output, demo_parse), (), reasoning)


def _demonstrated_calls(env: Any, rng: random.Random, demo_parse: Any) -> list[tuple[str, dict[str, Any]]]:
    scripted = getattr(env, "scripted_action", None)
    if scripted is None or demo_parse is None:
        return []
    try:
        parsed = demo_parse(scripted(rng, tool_use_prob=1.0))
    except Exception:  # noqa: BLE001 - a demonstrator that needs more context: fall back to a made-up call
        return []
    return [(c.name, c.arguments) for c in parsed.calls]


def _demonstrated_answer(env: Any, rng: random.Random, last_output: str | None, demo_parse: Any) -> str:
    scripted = getattr(env, "scripted_action", None)
    try:
        text = str(scripted(rng, tool_use_prob=0.0, last_tool_output=last_output)) if scripted else ""
    except Exception:  # noqa: BLE001 - fall back to a plain answer
        text = ""
    if not text or (demo_parse is not None and demo_parse(text).calls):
        return "The answer is 42."
    return text


def _plausible_call(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A call to `schema`'s tool with a value of the declared type for each required argument."""
    defaults = {"string": "1", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    params = schema.get("parameters", {})
    props = params.get("properties", {})
    required = params.get("required", list(props))
    return schema["name"], {k: defaults.get(props.get(k, {}).get("type"), "1") for k in required}
