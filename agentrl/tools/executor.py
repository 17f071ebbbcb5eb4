"""Runs parsed tool calls under each tool's policy; every failure becomes a typed tool message.

Validation uses `jsonschema` against the tool's declared parameters before anything runs.
Timeouts, concurrency limits, output caps and retries come from the tool's `ToolPolicy`. The
executor never raises on anything a model wrote: the result list always has one entry per call
(plus one per unreadable call) and the error counts go into metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Sequence

import jsonschema

from agentrl.errors import ToolError, ToolErrorKind, did_you_mean
from agentrl.tools.core import Tool, ToolCall, ToolResult
from agentrl.tools.parsers import ParseIssue
from agentrl.tools.schema import InexactIntegerError, integral_floats_to_int

TRUNCATION_MARKER = "\n...[output truncated: {n} more characters]"
# A name the model wrote is echoed back (message and tool message name) only this far: a hostile
# turn can name a tool with up to a megabyte of text, which must not be copied into the context.
MAX_ECHOED_NAME_CHARS = 80


class InfrastructureFault(Exception):
    """Raised by a tool for faults that are not the model's doing (retried per policy)."""


def _format_output(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _schema_error_message(err: jsonschema.ValidationError) -> str:
    path = "$" + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in err.absolute_path)
    return f"at {path}: {err.message[:300]}"


class ToolExecutor:
    """Executes calls against a fixed set of tools.

    Args:
        tools: The tools the model may call.
        max_calls_per_turn: Calls beyond this in one turn get a RATE_LIMITED error each.

    Example:
        >>> ex = ToolExecutor([echo_tool])          # doctest: +SKIP
        >>> results = await ex.execute(parsed.calls, parsed.issues)  # doctest: +SKIP
    """

    def __init__(self, tools: Iterable[Tool], max_calls_per_turn: int = 8):
        self.tools = {t.name: t for t in tools}
        self.max_calls_per_turn = max_calls_per_turn
        self._validators = {
            name: jsonschema.Draft202012Validator(t.parameters) for name, t in self.tools.items()
        }
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self.error_counts: Counter[str] = Counter()
        self.calls_total = 0

    def _semaphore(self, tool: Tool) -> asyncio.Semaphore:
        sem = self._semaphores.get(tool.name)
        if sem is None:
            sem = self._semaphores[tool.name] = asyncio.Semaphore(tool.policy.max_concurrency)
        return sem

    async def execute(self, calls: Sequence[ToolCall], issues: Sequence[ParseIssue] = ()) -> list[ToolResult]:
        """Run `calls` concurrently; return results in order, parse issues first."""
        # Unreadable calls have no id to answer, so past the per-turn limit they are summarised in
        # one message (still counted one by one) instead of flooding the context.
        shown = issues[: self.max_calls_per_turn]
        results: list[ToolResult] = [self._error("", ToolError(ToolErrorKind.PARSE, i.message)) for i in shown]
        if len(issues) > len(shown):
            extra = len(issues) - len(shown)
            results.append(self._error("", ToolError(
                ToolErrorKind.PARSE, f"{extra} more malformed tool calls in this turn were not read")))
            self.error_counts[ToolErrorKind.PARSE.value] += extra - 1
        allowed = list(calls[: self.max_calls_per_turn])
        over = calls[self.max_calls_per_turn :]
        results += await asyncio.gather(*(self._run_one(c) for c in allowed))
        for c in over:
            results.append(self._error(c.name[:MAX_ECHOED_NAME_CHARS], ToolError(
                ToolErrorKind.RATE_LIMITED,
                f"at most {self.max_calls_per_turn} tool calls are allowed per turn; this call was not run",
            ), c.id))
        return results

    def _error(self, name: str, err: ToolError, call_id: str = "") -> ToolResult:
        self.error_counts[err.kind.value] += 1
        return ToolResult(name=name, content=err.to_model_text(), call_id=call_id, error_kind=err.kind)

    async def _run_one(self, call: ToolCall) -> ToolResult:
        self.calls_total += 1
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools))
            shown = call.name[:MAX_ECHOED_NAME_CHARS]
            hint = did_you_mean(call.name, self.tools) if len(call.name) <= MAX_ECHOED_NAME_CHARS else ""
            return self._error(shown, ToolError(
                ToolErrorKind.UNKNOWN_TOOL, f"no tool named {shown!r}.{hint} Available: {known}",
            ), call.id)
        err = jsonschema.exceptions.best_match(self._validators[tool.name].iter_errors(call.arguments))
        if err is not None:
            return self._error(tool.name, ToolError(
                ToolErrorKind.INVALID_ARGUMENTS, f"invalid arguments for {tool.name!r} {_schema_error_message(err)}"
            ), call.id)
        try:  # JSON Schema accepts 2.0 as an integer; an `int` parameter still gets the int 2
            arguments = integral_floats_to_int(call.arguments, tool.parameters)
        except InexactIntegerError as exc:
            return self._error(tool.name, ToolError(
                ToolErrorKind.INVALID_ARGUMENTS, f"invalid arguments for {tool.name!r} {exc}"), call.id)
        try:
            async with self._semaphore(tool):
                output = await self._invoke_with_retries(tool, arguments)
        except ToolError as exc:
            return self._error(tool.name, exc, call.id)
        text = _format_output(output)
        limit = tool.policy.max_output_chars
        if len(text) > limit:
            self.error_counts[ToolErrorKind.OUTPUT_TOO_LARGE.value] += 1
            text = text[:limit] + TRUNCATION_MARKER.format(n=len(text) - limit)
            return ToolResult(tool.name, text, call.id, ToolErrorKind.OUTPUT_TOO_LARGE)
        return ToolResult(tool.name, text, call.id)

    async def _invoke_with_retries(self, tool: Tool, arguments: dict) -> object:
        attempts = tool.policy.retries + 1
        for attempt in range(attempts):
            try:
                return await asyncio.wait_for(self._invoke(tool, arguments), timeout=tool.policy.timeout_s)
            except ToolError:
                raise
            except (asyncio.TimeoutError, TimeoutError):
                raise ToolError(ToolErrorKind.TIMEOUT, f"{tool.name!r} did not finish within {tool.policy.timeout_s:g} s")
            except InfrastructureFault as exc:
                if attempt + 1 == attempts:
                    raise ToolError(ToolErrorKind.RUNTIME, f"{tool.name!r} is unavailable: {str(exc)[:200]}")
            except (Exception, RecursionError) as exc:  # a tool bug or a bad value: the model sees the type and text only
                raise ToolError(ToolErrorKind.RUNTIME, f"{tool.name!r} failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise AssertionError("unreachable")

    async def _invoke(self, tool: Tool, arguments: dict) -> object:
        if tool.is_async:
            return await tool.fn(**arguments)
        return await asyncio.to_thread(tool.fn, **arguments)
