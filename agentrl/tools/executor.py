"""Runs parsed tool calls under each tool's policy; every failure becomes a typed tool message.

Validation uses `jsonschema` against the tool's declared parameters before anything runs.
Timeouts, concurrency limits, output caps and retries come from the tool's `ToolPolicy`. The
executor never raises on anything a model wrote or a tool did: whatever a tool raises
(`SystemExit`, `KeyboardInterrupt` and `GeneratorExit` included) or returns (see
`agentrl.tools.render`) becomes text or a typed error naming the tool, and the error counts go into
metrics. Every call gets one result; calls past the per-turn limit share one summary result.

How calls run:

* A sync tool runs on its own daemon thread, never in asyncio's shared default executor (a hung
  tool must not starve everything else that uses `asyncio.to_thread`). Its result is turned into
  text on that thread, so an object whose `__str__` hangs is bounded by the same timeout. Past
  the timeout the call is abandoned: the model gets a `timeout` error at once, the thread runs on
  (it cannot be killed) and is counted in `agentrl.tools.limits` until it returns.
* An async tool runs as a task of the caller's loop. Past the timeout it is cancelled; if it
  ignores cancellation for `CANCEL_GRACE_S`, it is abandoned and counted the same way. An async
  tool that blocks the loop (e.g. `time.sleep`) stops every episode on that loop: that cannot be
  bounded from inside the loop.
* A `KeyboardInterrupt` raised in a tool's thread, or in an async tool where Ctrl-C cannot raise
  it (see `agentrl.tools.blocking.ctrl_c_raises_here`), is the tool's; a user's Ctrl-C still stops
  the program. `asyncio.CancelledError` from a cancelled caller propagates; one the tool raised
  on its own is a tool error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import jsonschema

# InfrastructureFault lives in agentrl.errors (envs raise it too); tools may keep importing it from here.
from agentrl.errors import ConfigError, InfrastructureFault, ToolError, ToolErrorKind, did_you_mean
from agentrl.tools.blocking import ctrl_c_raises_here
from agentrl.tools.context import ToolContext
from agentrl.tools.core import Tool, ToolCall, ToolResult
from agentrl.tools.limits import ToolState, tool_state
from agentrl.tools.parsers import ParseIssue
from agentrl.tools.render import NeedsUserCode, Rendered, describe_exception, render_value, valid_unicode
from agentrl.tools.schema import InexactIntegerError, integral_floats_to_int
from agentrl.tools.threads import AbandonableThread

logger = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n...[output truncated: {n} more characters]"
TRUNCATION_MARKER_OPEN = "\n...[output truncated after {limit} characters]"
TURN_CUT_MARKER = "\n...[cut: this turn's tool output is limited to {limit} characters; {n} more characters]"
# A name the model wrote is echoed back (message and tool message name) only this far: a hostile
# turn can name a tool with up to a megabyte of text, which must not be copied into the context.
MAX_ECHOED_NAME_CHARS = 80
DEFAULT_MAX_OBSERVATION_CHARS = 65_536
CANCEL_GRACE_S = 0.25  # how long a cancelled async tool may take to stop before it is abandoned
MIN_RENDER_S = 0.1  # time an async tool's result always gets to be turned into text
_MIN_KEPT_CHARS = 200  # below this, a result over its share of the turn's limit is withheld rather than cut
SHORT_RESULT_CHARS = 512  # results this short (errors, summaries) are never cut by the turn's limit
MIN_OBSERVATION_CHARS = 1000


@dataclass(frozen=True)
class _Outcome:
    """One attempt's result: rendered text, a typed error, or an infrastructure fault to retry."""

    rendered: Rendered | None = None
    error: ToolError | None = None
    fault: str | None = None


def _value_outcome(value: object, limit: int, allow_user_code: bool) -> _Outcome:
    if inspect.iscoroutine(value):
        value.close()
        return _Outcome(error=ToolError(ToolErrorKind.RUNTIME, "the tool returned a coroutine without awaiting it"))
    return _Outcome(rendered=render_value(value, limit, allow_user_code=allow_user_code))


def _exception_outcome(name: str, exc: BaseException, limit: int, allow_user_code: bool) -> _Outcome:
    """The typed error for what a tool raised; raises `NeedsUserCode` only when not `allow_user_code`."""
    if isinstance(exc, ToolError):  # the tool's own typed error: its kind and message reach the model
        if type(exc) is not ToolError and not allow_user_code:
            raise NeedsUserCode(type(exc).__name__)
        kind = exc.kind if isinstance(exc.kind, ToolErrorKind) else ToolErrorKind.RUNTIME
        shown = render_value(exc.message, limit, allow_user_code=allow_user_code)
        return _Outcome(error=ToolError(kind, shown.text + (TRUNCATION_MARKER_OPEN.format(limit=limit) if shown.cut else "")))
    plain = (InfrastructureFault,)
    if isinstance(exc, InfrastructureFault):
        return _Outcome(fault=describe_exception(exc, 200, allow_user_code=allow_user_code, plain_types=plain))
    text = describe_exception(exc, 300, allow_user_code=allow_user_code, plain_types=plain)
    if not isinstance(exc, Exception):  # a bug in the tool, not the model's doing: its author should know
        logger.warning("tool %r raised %s; it became a tool error (a tool must not exit or interrupt the process)",
                       name, text[:200])
    return _Outcome(error=ToolError(ToolErrorKind.RUNTIME, f"{name!r} failed: {text}"))


_UNRENDERABLE = _Outcome(error=ToolError(ToolErrorKind.RUNTIME, "the tool's result could not be turned into text"))


def _sync_work(tool: Tool, arguments: dict) -> Callable[[], _Outcome]:
    def work() -> _Outcome:
        limit = tool.policy.max_output_chars
        try:
            value = tool.fn(**arguments)
        except BaseException as exc:  # noqa: BLE001 - on this thread, SystemExit and KeyboardInterrupt are the tool's
            return _exception_outcome(tool.name, exc, limit, True)
        return _value_outcome(value, limit, True)

    return work


async def _guarded(fn: Callable, arguments: dict) -> tuple[bool, object]:
    """(True, value) or (False, exception) of an async tool; only the caller's cancellation escapes."""
    try:
        return True, await fn(**arguments)
    except asyncio.CancelledError as exc:
        if asyncio.current_task().cancelling():  # our timeout or our caller: not the tool's doing
            raise
        return False, exc
    except KeyboardInterrupt as exc:
        if ctrl_c_raises_here():  # could be the user's Ctrl-C: it must stop the program
            raise
        return False, exc
    except BaseException as exc:  # noqa: BLE001 - SystemExit, GeneratorExit, ...: the tool's
        return False, exc


def _timeout(tool: Tool, note: str = "") -> _Outcome:
    return _Outcome(error=ToolError(ToolErrorKind.TIMEOUT, f"{tool.name!r} did not finish within {tool.policy.timeout_s:g} s{note}"))


class ToolExecutor:
    """Executes calls against a fixed set of tools.

    Args:
        tools: The tools the model may call.
        max_calls_per_turn: Calls beyond this in one turn are not run; one summary result
            answers them all (each is still counted as `rate_limited`).
        max_observation_chars: Total characters of one turn's results (at least 1,000). Long
            results share it equally and are cut with a marker (see `_cap_turn`); short ones (errors,
            summaries) stay whole. Each call still gets its own result.

    Example:
        >>> ex = ToolExecutor([echo_tool])          # doctest: +SKIP
        >>> results = await ex.execute(parsed.calls, parsed.issues)  # doctest: +SKIP
    """

    def __init__(self, tools: Iterable[Tool], max_calls_per_turn: int = 8,
                 max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS):
        if not isinstance(max_observation_chars, int) or max_observation_chars < MIN_OBSERVATION_CHARS:
            raise ConfigError(f"max_observation_chars must be an integer >= {MIN_OBSERVATION_CHARS} (room for the "
                              f"notices that say what was cut), got {max_observation_chars!r}")
        self.tools = {t.name: t for t in tools}
        self.max_calls_per_turn = max_calls_per_turn
        self.max_observation_chars = max_observation_chars
        self._validators = {
            name: jsonschema.Draft202012Validator(t.parameters) for name, t in self.tools.items()
        }
        self.error_counts: Counter[str] = Counter()
        self.calls_total = 0

    async def execute(self, calls: Sequence[ToolCall], issues: Sequence[ParseIssue] = (),
                      context: ToolContext | None = None) -> list[ToolResult]:
        """Run `calls`; return results in order, parse issues first.

        Calls run concurrently, except those of tools that take a `ToolContext`: they get
        `context` and run one after another in the order written, since they change one state.
        """
        # Unreadable calls have no id to answer, so past the per-turn limit they are summarised in
        # one message (still counted one by one) instead of flooding the context.
        shown = issues[: self.max_calls_per_turn]
        results: list[ToolResult] = [self._error("", ToolError(ToolErrorKind.PARSE, i.message)) for i in shown]
        if len(issues) > len(shown):
            extra = len(issues) - len(shown)
            results.append(self._error("", ToolError(
                ToolErrorKind.PARSE, f"{extra} more malformed tool calls in this turn were not read")))
            self.error_counts[ToolErrorKind.PARSE.value] += extra - 1
        allowed, over = calls[: self.max_calls_per_turn], calls[self.max_calls_per_turn :]
        results += await self._run_allowed(allowed, context)
        if over:
            results.append(self._over_the_limit(over))
        return self._cap_turn(results)

    async def _run_allowed(self, calls: Sequence[ToolCall], context: ToolContext | None) -> list[ToolResult]:
        in_order = [i for i, c in enumerate(calls) if getattr(self.tools.get(c.name), "context_arg", None)]

        async def one_by_one() -> list[ToolResult]:
            return [await self._run_one(calls[i], context) for i in in_order]

        ordered = set(in_order)
        rest = [i for i in range(len(calls)) if i not in ordered]
        chained, *others = await asyncio.gather(one_by_one(), *(self._run_one(calls[i], context) for i in rest))
        out: dict[int, ToolResult] = dict(zip(in_order, chained)) | dict(zip(rest, others))
        return [out[i] for i in range(len(calls))]

    def _over_the_limit(self, over: Sequence[ToolCall]) -> ToolResult:
        names = Counter(c.name[:MAX_ECHOED_NAME_CHARS] for c in over)
        listed = ", ".join(f"{n!r} x{k}" for n, k in names.most_common(3))
        if len(names) > 3:
            listed += f" and {len(names) - 3} other names"
        result = self._error("", ToolError(ToolErrorKind.RATE_LIMITED, (
            f"at most {self.max_calls_per_turn} tool calls are allowed per turn; the other {len(over)} calls "
            f"in this turn were not run ({listed})")), over[0].id)  # it answers the first call it stands for
        self.error_counts[ToolErrorKind.RATE_LIMITED.value] += len(over) - 1
        return result

    def _cap_turn(self, results: list[ToolResult]) -> list[ToolResult]:
        """Keep the turn's results within `max_observation_chars`, saying what was cut.

        Short results (errors, summaries: up to `SHORT_RESULT_CHARS`) stay whole; the long ones
        share what is left equally ("water-filling": a result under the share keeps all of it).
        A long result over the share is cut to it with a marker, or, when the share is too small
        to be useful, replaced by a notice of the same kind.
        """
        long = [i for i, r in enumerate(results) if len(r.content) > SHORT_RESULT_CHARS]
        room = self.max_observation_chars - sum(len(r.content) for r in results) + sum(
            len(results[i].content) for i in long)
        share = _fair_share([len(results[i].content) for i in long], max(room, 0))
        out = list(results)
        for i in long:
            r, size = results[i], len(results[i].content)
            if size <= share:
                continue
            kind = r.error_kind or ToolErrorKind.OUTPUT_TOO_LARGE
            if r.error_kind is None:
                self.error_counts[kind.value] += 1
            marker = TURN_CUT_MARKER.format(limit=self.max_observation_chars, n=size - share)
            keep = share - len(marker)
            if keep >= _MIN_KEPT_CHARS:
                content = r.content[:keep] + marker
            else:
                content = ToolError(kind, f"not shown: this turn's tool output is limited to {self.max_observation_chars}"
                                          f" characters ({size} characters withheld); make fewer or smaller calls"
                                    ).to_model_text()
            out[i] = replace(r, content=content, error_kind=kind)
        return out

    def _error(self, name: str, err: ToolError, call_id: str = "") -> ToolResult:
        self.error_counts[err.kind.value] += 1
        return ToolResult(name=valid_unicode(name), content=valid_unicode(err.to_model_text()),
                          call_id=call_id, error_kind=err.kind)

    async def _run_one(self, call: ToolCall, context: ToolContext | None = None) -> ToolResult:
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
        if tool.context_arg is not None:
            if context is None:
                return self._error(tool.name, ToolError(ToolErrorKind.RUNTIME, (
                    f"{tool.name!r} works on an episode's state but was called outside an episode; offer it "
                    "through a ToolEnv")), call.id)
            arguments = {**arguments, tool.context_arg: context}
        state = tool_state(tool, tool.name, tool.policy.max_concurrency)
        await state.slots.acquire()
        try:
            outcome = await self._attempts(tool, state, arguments)
        finally:
            state.slots.release()
        if outcome.error is not None:
            return self._error(tool.name, outcome.error, call.id)
        rendered = outcome.rendered
        assert rendered is not None
        if not rendered.cut:
            return ToolResult(tool.name, rendered.text, call.id)
        self.error_counts[ToolErrorKind.OUTPUT_TOO_LARGE.value] += 1
        limit = tool.policy.max_output_chars
        marker = (TRUNCATION_MARKER.format(n=rendered.total - limit) if rendered.total is not None
                  else TRUNCATION_MARKER_OPEN.format(limit=limit))
        return ToolResult(tool.name, rendered.text + marker, call.id, ToolErrorKind.OUTPUT_TOO_LARGE)

    async def _attempts(self, tool: Tool, state: ToolState, arguments: dict) -> _Outcome:
        policy = tool.policy
        fault = ""
        for _ in range(policy.retries + 1):
            if state.abandoned_running >= policy.max_abandoned:
                return _Outcome(error=ToolError(ToolErrorKind.UNAVAILABLE, (
                    f"{tool.name!r} is not taking calls now: {state.abandoned_running} earlier calls passed their "
                    f"{policy.timeout_s:g} s timeout and are still running; try again later")))
            outcome = await (self._attempt_async if tool.is_async else self._attempt_sync)(tool, state, arguments)
            if outcome.fault is None:
                return outcome
            fault = outcome.fault
        # Its own kind: the episode it happens in is an infrastructure failure, not the model's mistake.
        return _Outcome(error=ToolError(ToolErrorKind.INFRASTRUCTURE, f"{tool.name!r} is unavailable: {fault}"))

    async def _attempt_sync(self, tool: Tool, state: ToolState, arguments: dict) -> _Outcome:
        return await self._on_thread(tool, state, _sync_work(tool, arguments), tool.policy.timeout_s)

    async def _on_thread(self, tool: Tool, state: ToolState, work: Callable[[], _Outcome], timeout_s: float,
                         note: str = "") -> _Outcome:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        call = AbandonableThread(work, _UNRENDERABLE, state, tool.policy.max_abandoned, future)
        try:
            call.start()
        except RuntimeError as exc:  # "can't start new thread": the process is out of threads
            return _Outcome(error=ToolError(ToolErrorKind.UNAVAILABLE, f"{tool.name!r} could not start: {exc}"))
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout_s)
        except BaseException:  # the caller was cancelled (an aborted episode, Ctrl-C): the thread runs on
            call.abandon("was cancelled by its caller")
            raise
        if not done and call.abandon(f"passed its {timeout_s:g} s timeout"):
            return _timeout(tool, f"{note}; its thread is still running")
        outcome = future.result() if done else await future  # if not done, it finished at the deadline
        if call.seconds is not None and call.seconds > timeout_s:
            # It returned, but past its limit: a busy loop noticed late. The limit is the tool's
            # own running time, so the outcome does not depend on how loaded the loop was.
            return _timeout(tool, note)
        return outcome

    async def _attempt_async(self, tool: Tool, state: ToolState, arguments: dict) -> _Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = loop.create_task(_guarded(tool.fn, arguments), name=f"agentrl-tool-{tool.name[:40]}")
        try:
            done, _ = await asyncio.wait({task}, timeout=tool.policy.timeout_s)
        except BaseException:
            task.cancel()
            raise
        if not done:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
            if not done:
                _track_abandoned_task(task, state, tool)
                return _timeout(tool, f"; it ignored cancellation for {CANCEL_GRACE_S:g} s and still runs")
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it: the timeout is what counts
            return _timeout(tool)
        if task.cancelled():  # cancelled by something the tool did, not by this executor
            return _Outcome(error=ToolError(ToolErrorKind.RUNTIME, f"{tool.name!r} failed: its task was cancelled"))
        returned, payload = task.result()
        limit = tool.policy.max_output_chars
        try:
            if returned:
                return _value_outcome(payload, limit, False)
            return _exception_outcome(tool.name, payload, limit, False)  # type: ignore[arg-type]
        except NeedsUserCode:  # its own __str__ must run, where a hang is bounded by the timeout
            work = (lambda: _value_outcome(payload, limit, True)) if returned else (
                lambda: _exception_outcome(tool.name, payload, limit, True))  # type: ignore[arg-type]
            left = max(tool.policy.timeout_s - (loop.time() - started), MIN_RENDER_S)
            return await self._on_thread(tool, state, work, left, " (turning its result into text)")


def _track_abandoned_task(task: asyncio.Task, state: ToolState, tool: Tool) -> None:
    """Count an async call that ignores cancellation until its task ends or is collected."""
    state.abandon(f"passed its {tool.policy.timeout_s:g} s timeout and ignored cancellation", tool.policy.max_abandoned,
                  on_thread=False)
    since = time.monotonic()
    once = threading.Lock()

    def ended(*_: object) -> None:
        if once.acquire(blocking=False):
            state.abandoned_returned(time.monotonic() - since, on_thread=False)

    # A task left on a loop that was closed never ends; it only gets collected.
    finalizer = weakref.finalize(task, ended)
    task.add_done_callback(lambda t: (t.cancelled() or t.exception(), finalizer()))


def _fair_share(sizes: list[int], room: int) -> int:
    """The largest s with sum(min(x, s) for x in sizes) <= room (max(sizes) when all fit)."""
    left, n = room, len(sizes)
    for k, size in enumerate(sorted(sizes)):
        if size * (n - k) > left:
            return left // (n - k)
        left -= size
    return max(sizes, default=0)


def _schema_error_message(err: jsonschema.ValidationError) -> str:
    path = "$" + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in err.absolute_path)
    return f"at {path}: {err.message[:300]}"
