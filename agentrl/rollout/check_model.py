"""`check_model`: will a model directory's tokenizer, chat template and tool-call parser work for RL on an env?

A pre-flight check to run before spending GPU hours. It reads the tokenizer and the model's config
(never the weights) and reports, one row each:

- tokenizer: it loads, and its ids fit the model's embedding table;
- end of turn: the eos (end-of-turn) token exists and the template closes model turns with it;
- special tokens: every control marker the template writes (`<|im_start|>`, `[INST]`, `<s>`) is
  one token of the tokenizer, not a string of pieces the model never learned;
- tool messages: the template renders tool results after a model turn, with agentrl's call ids
  (and whether it requires them);
- tool-call format: the parser reads back the calls the template itself writes;
- episodes, append-only, tool-call ids: scripted episodes of the env (tool calls, tool errors,
  several calls in a turn, an answer) run through the same `ChatRenderer` calls as the agent loop,
  each model turn written in the template's own format the way a model trained on it samples it
  (`scripted.py`). At every turn the token ids the model would see are compared with a full
  re-render of the conversation so far; the first difference is shown as text;
- engine architecture: whether the built-in engine runs the model's architecture.

`agentrl check-model MODEL_DIR --env ID` prints the rows and exits 1 when any row fails.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.envs.checker import CheckReport, CheckResult
from agentrl.envs.core import Message
from agentrl.envs.registration import make
from agentrl.errors import AgentRLError, ChatTemplateError, EngineError
from agentrl.rollout.chat import PROBE_QUESTION, ChatRenderer
from agentrl.rollout.scripted import CALL_WRITERS, TurnWriter, play_episode, probe_call_turn
from agentrl.tools.core import call_id
from agentrl.tools.parsers import bind_parser

# Markers that templates write as single control tokens: `<|im_start|>`, `[INST]`, `<s>`, `</s>`.
_MARKERS = re.compile(r"<\|[^|<>\s]{1,40}\|>|\[/?[A-Z][A-Z_]{1,30}\]|</?s>")


@dataclass(frozen=True)
class ModelCheckReport(CheckReport):
    """All rows of `check_model` (`ok` is False when any row failed), and the model they are about."""

    model: str = ""


def check_model(model_dir: str | Path, env_id: str, parser: str | None = None, episodes: int = 3,
                template_kwargs: dict[str, Any] | None = None, env_kwargs: dict[str, Any] | None = None
                ) -> ModelCheckReport:
    """Check a model directory against an env; see the module docstring for the rows.

    Args:
        model_dir: A Hugging Face model directory (tokenizer files and config.json).
        env_id: A registered env id.
        parser: The tool-call parser to check (default: the env's own). A `ToolEnv` is switched to it.
        episodes: Scripted episodes to play (seeds 0, 1, ...).
        template_kwargs: Extra template variables, as `ChatRenderer` takes them.
        env_kwargs: Keyword arguments for `make(env_id, ...)`.

    Example:
        >>> report = check_model("models/tiny-calculator", "calculator-v0")  # doctest: +SKIP
        >>> report.ok  # doctest: +SKIP
        True
    """
    env = make(env_id, **(env_kwargs or {}))  # a RegistryError for an unknown id goes to the caller
    demo_parse = getattr(env, "parse", None)
    parser = parser or getattr(env, "parser_name", None) or "hermes"
    schemas = {t.name: t.parameters for t in getattr(env, "tools", ())}
    if demo_parse is not None:  # the env reads turns with the parser under check
        env.parse, env.parser_name = bind_parser(parser, schemas), parser
    try:
        with warnings.catch_warnings():
            # the renderer's warning about dropped reasoning is the append-only row's to report
            warnings.filterwarnings("ignore", message="the chat template drops earlier turns' reasoning")
            rows = _rows(Path(model_dir), env, parser, demo_parse, episodes, template_kwargs)
    finally:
        env.close()
    return ModelCheckReport(env=env_id, results=tuple(rows), model=str(model_dir))


def _rows(model_dir: Path, env: Any, parser: str, demo_parse: Any, episodes: int,
          template_kwargs: dict[str, Any] | None) -> list[CheckResult]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        return [CheckResult("tokenizer", "fail", f"cannot load {model_dir}: {str(exc)[:300]}")]
    rows = [_tokenizer_row(tokenizer, config)]
    has_tools = bool(env.tool_schemas())
    try:
        renderer = ChatRenderer(tokenizer, env.tool_schemas(), template_kwargs=template_kwargs)
    except AgentRLError as exc:
        return rows + [CheckResult("end of turn", "fail", str(exc)), _architecture_row(config)]
    rows.append(CheckResult("end of turn", "pass", f"{renderer.end_of_turn!r} (id {renderer.end_of_turn_id}) "
                            f"closes model turns; a model turn reads {renderer.model_turn!r}"))
    rows.append(_special_tokens_row(renderer))
    tool_row, ids_required = _tool_messages_row(renderer, has_tools)
    rows.append(tool_row)
    writer = TurnWriter(renderer, parser)
    schemas = {t.name: t.parameters for t in getattr(env, "tools", ())}
    rows.append(_round_trip_row(writer, bind_parser(parser, schemas), parser, has_tools))
    rows += _episode_rows(env, renderer, writer, demo_parse, episodes, ids_required)
    rows.append(_architecture_row(config))
    return rows


def _tokenizer_row(tokenizer: Any, config: Any) -> CheckResult:
    size, rows = len(tokenizer), getattr(config, "vocab_size", None)
    if rows is not None and size > rows:
        return CheckResult("tokenizer", "fail", f"the tokenizer has {size} tokens but the model's embedding table "
                           f"has {rows} rows: ids {rows}..{size - 1} would index past it (resize the embeddings)")
    return CheckResult("tokenizer", "pass", f"{type(tokenizer).__name__}, {size} tokens, model vocab {rows}")


def _special_tokens_row(renderer: ChatRenderer) -> CheckResult:
    """Markers written by the template (not by the messages) must each be one token."""
    texts = []
    for conversation in _sample_conversations(renderer):
        try:
            texts.append(renderer.render(conversation, add_generation_prompt=conversation[-1]["role"] != "assistant"))
        except Exception:  # noqa: BLE001 - a shape the template rejects is reported by the tool and episode rows
            continue
    schemas = json.dumps(renderer.tools or [])  # markers in the env's tool descriptions are the env's text
    found = sorted({m for text in texts for m in _MARKERS.findall(text) if m not in schemas})
    split = {m: renderer.encode(m) for m in found}
    split = {m: ids for m, ids in split.items() if len(ids) != 1}
    if split:
        shown = "; ".join(f"{m!r} -> {len(ids)} tokens {[renderer.decode([i]) for i in ids]}"
                          for m, ids in split.items())
        return CheckResult("special tokens", "fail", f"the template writes markers the tokenizer splits into pieces: "
                           f"{shown}. Add them as special tokens (and train), or fix the template")
    return CheckResult("special tokens", "pass", f"each is one token: {', '.join(found) or '(no markers)'}")


def _sample_conversations(renderer: ChatRenderer) -> list[list[dict[str, Any]]]:
    question = {"role": "user", "content": PROBE_QUESTION}
    turn = {"role": "assistant", "content": renderer.model_turn}
    tool = {"role": "tool", "content": "probe result", "tool_call_id": call_id(0), "name": "probe_tool"}
    return [[{"role": "system", "content": "probe system"}, question], [question],
            [question, turn], [question, turn, tool]]


def _tool_messages_row(renderer: ChatRenderer, has_tools: bool) -> tuple[CheckResult, str | None]:
    """Can a tool result follow a model turn? Returns the row and, when the template requires call
    ids, its complaint about a tool message without one."""
    if not has_tools:
        return CheckResult("tool messages", "skip", "the env offers no tools"), None
    with_id = Message("tool", "probe result", name="probe_tool", tool_call_id=call_id(0))
    try:
        suffix = renderer.decode(renderer.observation_ids([with_id]))
    except ChatTemplateError as exc:
        return CheckResult("tool messages", "fail", f"a tool result after a model turn: {exc}"), None
    required = None
    try:
        renderer.observation_ids([Message("tool", "probe result", name="probe_tool")])
    except ChatTemplateError as exc:
        required = str(exc.__cause__ or exc)
    ids = (f"requires call ids ({required[:160]}); ToolEnv gives {call_id(0)!r}-style ids" if required
           else "renders the call id" if call_id(0) in suffix else "does not use call ids")
    return CheckResult("tool messages", "pass", f"a tool result renders as {suffix!r}; the template {ids}"), required


def _round_trip_row(writer: TurnWriter, parse: Any, parser: str, has_tools: bool) -> CheckResult:
    """The parser must read back the calls of a model turn written in the template's own format."""
    name = "tool-call format"
    if not has_tools:
        return CheckResult(name, "skip", "the env offers no tools")
    if not writer.structured and writer.write_calls is None:
        return CheckResult(name, "skip", f"the template writes no tool_calls, and agentrl cannot write calls in the "
                           f"{parser!r} format to try the parser on (it can for {', '.join(CALL_WRITERS)})")
    turn = probe_call_turn()
    try:
        text, _ = writer.sampled_text([{"role": "user", "content": PROBE_QUESTION}],
                                      writer.message(turn, [call_id(0), call_id(1)]))
    except Exception as exc:  # noqa: BLE001 - the template's own complaint is the finding
        return CheckResult(name, "fail", f"the template cannot render a model turn with calls: "
                           f"{type(exc).__name__}: {str(exc)[:300]}")
    read = parse(text)
    got = [(c.name, c.arguments) for c in read.calls]
    if got != list(turn.calls):
        issues = "; ".join(i.message for i in read.issues) or "no call found"
        return CheckResult(name, "fail", f"parser {parser!r} reads {got} from the template's own tool-call text "
                           f"{text!r} ({issues}); expected {list(turn.calls)}. Use the parser of the template's format")
    how = ("the template writes calls from tool_calls" if writer.structured
           else f"the template writes no tool_calls, so calls are the model's text in the {parser!r} format")
    return CheckResult(name, "pass", f"{parser!r} reads back {len(got)} calls; {how}: {text!r}")


def _episode_rows(env: Any, renderer: ChatRenderer, writer: TurnWriter, demo_parse: Any, episodes: int,
                  ids_required: str | None) -> list[CheckResult]:
    records = [play_episode(env, renderer, writer, demo_parse, seed) for seed in range(episodes)]
    turns = sum(r.turns for r in records)
    calls = sum(r.calls for r in records)
    errors = sum((r.tool_errors for r in records), Counter())
    crashed = [r for r in records if r.env_error]
    stopped = sum(bool(r.refused) for r in records)
    rows = [CheckResult("episodes", "fail" if crashed else "pass",
                        f"seed {crashed[0].seed}: {crashed[0].env_error}" if crashed else
                        f"{len(records)} scripted episodes, {turns} model turns, {calls} tool calls, "
                        f"tool errors {dict(errors)}" + (f"; {stopped} stopped by the chat template (see "
                                                         "append-only)" if stopped else ""))]
    refused = next((r for r in records if r.refused), None)
    diverged = next((r for r in records if r.difference and r.difference[0] == "fail"), None)
    dropped = next((r for r in records if r.difference and r.difference[0] == "warn"), None)
    if refused or diverged:
        r = refused or diverged
        text = r.refused or r.difference[1]
        rows.append(CheckResult("append-only", "fail", f"seed {r.seed}: {text}"))
    elif dropped:
        rows.append(CheckResult("append-only", "warn", f"seed {dropped.seed}: {dropped.difference[1]}. The template "
                                "drops earlier turns' reasoning; agentrl keeps it as sampled (serve the model with "
                                "a template that keeps it too)"))
    else:
        rows.append(CheckResult("append-only", "pass", f"at each of {turns} turns the token ids equal a full "
                                "re-render of the conversation"))
    rows.append(_ids_row(records, writer, ids_required))
    return rows


def _ids_row(records: list[Any], writer: TurnWriter, ids_required: str | None) -> CheckResult:
    missing = next((r for r in records if r.ids_missing), None)
    wrong = next((r for r in records if r.ids_mismatch), None)
    if missing and ids_required:
        return CheckResult("tool-call ids", "fail", f"seed {missing.seed}: the env's tool messages carry no "
                           f"tool_call_id ({missing.ids_missing}), and the template requires one: {ids_required}")
    if wrong:
        return CheckResult("tool-call ids", "fail", f"seed {wrong.seed}: {wrong.ids_mismatch}")
    if writer.writes_ids:
        return CheckResult("tool-call ids", "warn", "the template writes call ids into the model's turn, so a model "
                           "trained on it writes its own; the parsers do not read them yet, and tool results answer "
                           "with ToolEnv's ids (call00000, call00001, ...)")
    return CheckResult("tool-call ids", "pass", "every tool result answers its call's id" if any(
        r.calls for r in records) else "no tool calls were made")


def _architecture_row(config: Any) -> CheckResult:
    """Asks the built-in engine's architecture table (docs/architectures.md), from the config alone."""
    from agentrl.rollout.backends.embedded.model_weights import check_architecture

    archs = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
    try:
        check_architecture(config)
    except EngineError as exc:
        return CheckResult("engine architecture", "fail", str(exc))
    return CheckResult("engine architecture", "pass", f"{archs} runs on the built-in engine")
