"""The executor: validation, typed errors shown to the model, counts, limits — and it never raises."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import ConfigError, InfrastructureFault, ToolError, ToolErrorKind
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor
from agentrl.tools.limits import abandoned_calls
from agentrl.tools.parsers import parse_hermes
from agentrl.tools.threads import AbandonableThread


@tool
def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: First term.
        b: Second term.
    """
    return a + b


@tool(policy=ToolPolicy(timeout_s=0.2))
async def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return "done"


@tool(policy=ToolPolicy(max_output_chars=10))
def shout(text: str) -> str:
    """Repeat loudly.

    Args:
        text: Words.
    """
    return text.upper() * 5


@tool
def crash() -> str:
    """Always fails."""
    raise KeyError("/home/secret/path")


def _run(executor, text):
    turn = parse_hermes(text)
    return asyncio.run(executor.execute(turn.calls, turn.issues))


def test_schema_from_signature_and_docstring():
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer", "description": "First term."},
                       "b": {"type": "integer", "description": "Second term.", "default": 0}},
        "required": ["a"], "additionalProperties": False,
    }
    assert add.description == "Add two integers."


def test_each_failure_kind_reaches_the_model_and_is_counted():
    ex = ToolExecutor([add, slow, shout, crash], max_calls_per_turn=8)
    cases = {
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>': None,
        '<tool_call>{"name": "add", "arguments": {"a": "two"}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "add", "arguments": {}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "ad", "arguments": {"a": 1}}</tool_call>': ToolErrorKind.UNKNOWN_TOOL,
        '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>': ToolErrorKind.PARSE,
        '<tool_call>{"name": "slow", "arguments": {"seconds": 5}}</tool_call>': ToolErrorKind.TIMEOUT,
        '<tool_call>{"name": "shout", "arguments": {"text": "hello"}}</tool_call>': ToolErrorKind.OUTPUT_TOO_LARGE,
        '<tool_call>{"name": "crash", "arguments": {}}</tool_call>': ToolErrorKind.RUNTIME,
    }
    for text, kind in cases.items():
        t0 = time.perf_counter()
        [result] = _run(ex, text)
        assert result.error_kind == kind, (text, result)
        assert time.perf_counter() - t0 < 2.0
        if kind == ToolErrorKind.OUTPUT_TOO_LARGE:  # the model still sees the head of the output
            assert result.content.startswith("HELLOHELLO") and "[output truncated: 15 more characters]" in result.content
        elif kind is not None:
            assert result.content.startswith(f"Error ({kind.value})")
    assert _run(ex, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')[0].content == "5"
    assert ex.error_counts == {"invalid_arguments": 3, "unknown_tool": 1, "parse": 1, "timeout": 1,
                               "output_too_large": 1, "runtime": 1}


def test_messages_are_helpful_and_leak_nothing():
    ex = ToolExecutor([add, crash])
    [r] = _run(ex, '<tool_call>{"name": "ad", "arguments": {"a": 1}}</tool_call>')
    assert "Did you mean 'add'" in r.content
    [r] = _run(ex, '<tool_call>{"name": "add", "arguments": {"a": "x"}}</tool_call>')
    assert "$['a']" in r.content and "'x' is not of type 'integer'" in r.content
    [r] = _run(ex, '<tool_call>{"name": "crash", "arguments": {}}</tool_call>')
    assert "Traceback" not in r.content and "KeyError" in r.content


def test_calls_over_the_per_turn_limit_share_one_summary_and_are_counted():
    ex = ToolExecutor([add, shout], max_calls_per_turn=2)
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>' * 299
            + '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    results = _run(ex, text)
    # 2 calls run, then ONE message for the other 298 (each counted): not 300 messages.
    assert [r.error_kind for r in results] == [None, None, ToolErrorKind.RATE_LIMITED]
    assert results[2].content == ("Error (rate_limited): at most 2 tool calls are allowed per turn; the other 298 "
                                  "calls in this turn were not run ('add' x297, 'nope' x1)")
    assert ex.error_counts == {"rate_limited": 298}


def test_huge_arguments_do_not_crash():
    ex = ToolExecutor([shout])
    big = "x" * 5_000_000
    [r] = asyncio.run(ex.execute([ToolCall("shout", {"text": big})]))
    assert r.error_kind == ToolErrorKind.OUTPUT_TOO_LARGE and len(r.content) < 200


def test_many_malformed_calls_are_summarised_but_counted():
    ex = ToolExecutor([add], max_calls_per_turn=3)
    results = _run(ex, "<tool_call>{bad</tool_call>" * 1000)
    # 3 issues shown one by one, then one summary for the other 997; all 1000 are counted.
    assert len(results) == 4
    assert all(r.error_kind == ToolErrorKind.PARSE for r in results)
    assert "997 more malformed tool calls" in results[-1].content
    assert ex.error_counts == {"parse": 1000}


# -- what tools return and raise ---------------------------------------------------------------
class Unprintable:
    def __str__(self):
        raise RuntimeError("no text for you")


@tool
def odd_value(which: str):
    """Return something awkward.

    Args:
        which: Which value.
    """
    loop = []
    loop.append(loop)
    return {"huge_int": 10**5000, "unprintable": Unprintable(), "recursive": loop, "nan": float("nan"),
            "bytes": b"caf\xe9", "surrogate": "a\udc80b"}[which]


@pytest.mark.parametrize("which, expected", [
    ("huge_int", "<integer of about 5001 digits: too long to print>"),
    ("unprintable", "<Unprintable object: str() raised RuntimeError>"),
    ("recursive", "[[...]]"),
    ("nan", "NaN"),
    ("bytes", "caf\ufffd"),
    ("surrogate", "a\ufffdb"),  # lone surrogates would break the tokenizer's UTF-8 encoding
])
def test_any_return_value_becomes_text(which, expected):
    [r] = asyncio.run(ToolExecutor([odd_value]).execute([ToolCall("odd_value", {"which": which})]))
    assert (r.content, r.error_kind) == (expected, None)


def _raiser(exc: BaseException, is_async: bool):
    if is_async:
        async def boom() -> str:
            """Raise."""
            raise exc
    else:
        def boom() -> str:
            """Raise."""
            raise exc
    return tool(boom)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("exc, text", [
    (SystemExit(3), "SystemExit: 3"),
    (KeyboardInterrupt(), "KeyboardInterrupt"),
    (GeneratorExit(), "GeneratorExit"),
    (asyncio.CancelledError(), "CancelledError"),
    (ValueError(10**5000), "ValueError: <message could not be printed>"),
])
def test_whatever_a_tool_raises_is_a_typed_error_naming_it(exc, text, is_async, caplog):
    # Inside asyncio.run a KeyboardInterrupt cannot come from Ctrl-C (asyncio.run handles SIGINT
    # itself), so the tool's own one is a tool error; test_blocking.py checks that Ctrl-C still stops.
    [r] = asyncio.run(ToolExecutor([_raiser(exc, is_async)]).execute([ToolCall("boom", {})]))
    assert (r.content, r.error_kind) == (f"Error (runtime): 'boom' failed: {text}", ToolErrorKind.RUNTIME)
    if not isinstance(exc, Exception) and not isinstance(exc, asyncio.CancelledError):
        assert any("'boom' raised" in m for m in caplog.messages)


def test_a_tools_own_typed_error_keeps_its_kind_and_is_bounded():
    @tool(policy=ToolPolicy(max_output_chars=50))
    def picky() -> str:
        """Refuse."""
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, "x" * 10_000)

    [r] = asyncio.run(ToolExecutor([picky]).execute([ToolCall("picky", {})]))
    assert r.error_kind == ToolErrorKind.INVALID_ARGUMENTS
    assert r.content == "Error (invalid_arguments): " + "x" * 50 + "\n...[output truncated after 50 characters]"


# -- timeouts, abandoned threads -------------------------------------------------------------
def _hanging_tool(release: threading.Event, name: str = "stuck", cap: int = 8, started: list | None = None,
                  timeout_s: float = 0.2):
    def stuck() -> str:
        """Wait for the test to let go."""
        if started is not None:
            started.append(name)
        release.wait(30)
        return "late"

    return tool(stuck, name=name, policy=ToolPolicy(timeout_s=timeout_s, max_abandoned=cap))


def test_sync_timeout_returns_on_time_and_the_thread_is_accounted_for(caplog):
    release, started = threading.Event(), []
    stuck = _hanging_tool(release, cap=2, started=started, timeout_s=2.0)  # 2 s: room to tell "at once" apart
    ex = ToolExecutor([stuck])
    try:
        for expected_running in (1, 2):
            t0 = time.perf_counter()
            [r] = asyncio.run(ex.execute([ToolCall("stuck", {})]))
            assert time.perf_counter() - t0 < 10.0  # 2 s timeout; the thread (held 30 s) is not waited for
            assert r.content == "Error (timeout): 'stuck' did not finish within 2 s; its thread is still running"
            assert abandoned_calls() == {"stuck": expected_running}
        assert "tool 'stuck': a call passed its 2 s timeout" in caplog.text
        # At the cap, calls are refused at once instead of piling up threads: no third thread starts.
        t0 = time.perf_counter()
        [r] = asyncio.run(ex.execute([ToolCall("stuck", {})]))
        assert time.perf_counter() - t0 < 2.0  # no wait for the 2 s timeout
        assert r.error_kind == ToolErrorKind.UNAVAILABLE and abandoned_calls() == {"stuck": 2}
        assert len(started) == 2
        assert "2 earlier calls passed their 2 s timeout and are still running" in r.content
        assert ex.error_counts == {"timeout": 2, "unavailable": 1}
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while abandoned_calls() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert abandoned_calls() == {}
    [r] = asyncio.run(ex.execute([ToolCall("stuck", {})]))  # the threads returned: calls are taken again
    assert r.content == "late"


def test_a_result_past_the_limit_is_a_timeout_even_when_a_busy_loop_notices_late(monkeypatch):
    @tool(policy=ToolPolicy(timeout_s=0.2))
    def slowish() -> str:
        """Take 0.3 s."""
        time.sleep(0.3)
        return "late"

    returned = threading.Event()  # set once the call's thread has handed its result over
    real_run = AbandonableThread._run

    def run(self):
        real_run(self)
        returned.set()

    monkeypatch.setattr(AbandonableThread, "_run", run)

    async def main():
        call = asyncio.ensure_future(ToolExecutor([slowish]).execute([ToolCall("slowish", {})]))
        await asyncio.sleep(0.01)  # the call's thread has started
        assert returned.wait(30)  # the loop is busy: by the time it looks, the tool has returned
        return await call

    [r] = asyncio.run(main())
    assert r.content == "Error (timeout): 'slowish' did not finish within 0.2 s"


def test_hung_sync_tools_do_not_starve_asyncio_to_thread():
    release = threading.Event()
    stuck = _hanging_tool(release, cap=8)

    async def main():
        # With one worker in the default executor, a tool run there would block to_thread below.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        calls = asyncio.ensure_future(ToolExecutor([stuck]).execute([ToolCall("stuck", {})] * 3))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1.0) == "free"
        return await calls

    try:
        results = asyncio.run(main())
        assert [r.error_kind for r in results] == [ToolErrorKind.TIMEOUT] * 3
    finally:
        release.set()


# -- max_concurrency: one limit per tool for the whole process --------------------------------
class Gauge:
    """Counts calls in progress and remembers the most seen at once.

    A call stays until `limit` calls are in (or 0.5 s passed), so that the peak reaches the limit
    however slowly the machine starts threads, and would pass it at once if the limit leaked.
    """

    def __init__(self, limit: int):
        self.limit, self.cond, self.now, self.peak, self.calls = limit, threading.Condition(), 0, 0, 0

    def enter(self):
        with self.cond:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
            self.cond.notify_all()

    def full(self) -> bool:
        return self.now >= self.limit

    def wait_full(self):
        with self.cond:
            self.cond.wait_for(self.full, timeout=0.5)

    def leave(self):
        with self.cond:
            self.now -= 1


def _gauged(is_async: bool, limit: int):
    gauge = Gauge(limit)
    if is_async:
        async def busy() -> str:
            """Be busy."""
            gauge.enter()
            deadline = time.monotonic() + 0.5
            while not gauge.full() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            gauge.leave()
            return "ok"
    else:
        def busy() -> str:
            """Be busy."""
            gauge.enter()
            gauge.wait_full()
            time.sleep(0.01)
            gauge.leave()
            return "ok"
    return tool(busy, policy=ToolPolicy(max_concurrency=limit)), gauge


class OneToolEnv(ToolEnv):
    def sample_task(self, split, seed):
        return Task(id=str(seed), prompt="Use the tool.", answer="", split=split)

    def score(self, task, answer):
        return 0.0


TWO_CALLS = '<tool_call>{"name": "busy", "arguments": {}}</tool_call>' * 2


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("limit", [1, 2])
def test_max_concurrency_holds_across_env_instances_in_one_loop(is_async, limit):
    busy, gauge = _gauged(is_async, limit)
    envs = [OneToolEnv([busy]) for _ in range(8)]

    async def all_turns():
        for env in envs:
            await env.areset(seed=0)
        for _ in range(2):
            steps = await asyncio.gather(*(env.astep(TWO_CALLS) for env in envs))
            assert all(m.content == "ok" for obs, *_ in steps for m in obs)

    asyncio.run(all_turns())
    assert gauge.calls == 32 and gauge.peak == limit


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_max_concurrency_holds_across_event_loops_and_later_steps(is_async):
    busy, gauge = _gauged(is_async, 1)
    envs = [OneToolEnv([busy]) for _ in range(8)]
    errors = []

    def play(env):  # each step() runs its own event loop, on its own thread
        try:
            env.reset(seed=0)
            for _ in range(3):
                obs, *_ = env.step(TWO_CALLS)
                assert [m.content for m in obs] == ["ok", "ok"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=play, args=(env,)) for env in envs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and gauge.calls == 48 and gauge.peak == 1


# -- the turn's observation ------------------------------------------------------------------
@tool(policy=ToolPolicy(max_output_chars=100_000))
def wordy(n: int) -> str:
    """Say a lot.

    Args:
        n: How much.
    """
    return "w" * n


def test_turn_output_is_shared_fairly_with_markers_and_every_call_keeps_a_result():
    ex = ToolExecutor([wordy], max_calls_per_turn=6, max_observation_chars=10_000)
    sizes = [1000, 9000, 6000, 100, 50_000]
    calls = [ToolCall("wordy", {"n": n}, id=f"c{i}") for i, n in enumerate(sizes)] + [ToolCall("nope", {}, id="c5")]
    results = asyncio.run(ex.execute(calls))
    assert [r.call_id for r in results] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    # Short results stay whole: 100 characters and the unknown-tool error (~60). The four long ones
    # share the rest (~9840) equally: a quarter (~2460) is more than 1000, so that one is whole, and
    # the other three get a third of what is left each (~2946).
    short = 100 + len(results[5].content)
    share = (10_000 - short - 1000) // 3
    assert results[0].content == "w" * 1000 and results[3].content == "w" * 100
    for r, size in zip(results[1:5:3] + results[2:3], [9000, 50_000, 6000]):
        marker = f"\n...[cut: this turn's tool output is limited to 10000 characters; {size - share} more characters]"
        assert r.content == "w" * (share - len(marker)) + marker and r.error_kind == ToolErrorKind.OUTPUT_TOO_LARGE
    assert sum(len(r.content) for r in results) <= 10_000
    assert results[5].error_kind == ToolErrorKind.UNKNOWN_TOOL
    assert ex.error_counts == {"output_too_large": 3, "unknown_tool": 1}


def test_a_share_too_small_to_be_useful_is_a_notice_and_summaries_are_never_cut():
    ex = ToolExecutor([wordy], max_calls_per_turn=4, max_observation_chars=1000)
    results = asyncio.run(ex.execute([ToolCall("wordy", {"n": 5000}, id=str(i)) for i in range(10)]))
    assert len(results) == 5
    for r in results[:4]:  # 1000 / 4 leaves too little for a useful head: each says it was withheld
        assert r.content == ("Error (output_too_large): not shown: this turn's tool output is limited to 1000 "
                             "characters (5000 characters withheld); make fewer or smaller calls")
    assert results[4].content.startswith("Error (rate_limited): at most 4 tool calls are allowed per turn; the other 6")
    assert ex.error_counts == {"output_too_large": 4, "rate_limited": 6}


def test_policy_values_are_checked():
    for bad in ({"timeout_s": 0}, {"timeout_s": float("inf")}, {"max_concurrency": 0}, {"max_abandoned": 0},
                {"retries": -1}, {"max_output_chars": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ToolPolicy(**bad)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_an_infrastructure_fault_is_retried_then_answered_with_its_own_kind(is_async):
    attempts = []

    def flaky(key: str) -> str:
        attempts.append(key)
        if key == "down" or len(attempts) == 1:  # "up" fails once: the retry absorbs it
            raise InfrastructureFault("the key-value service is down")
        return "value"

    async def flaky_async(key: str) -> str:
        return flaky(key)

    fn = flaky_async if is_async else flaky
    fn.__doc__ = "Look a key up.\n\nArgs:\n    key: The key.\n"
    lookup = tool(fn, name="lookup", policy=ToolPolicy(retries=2))
    ex = ToolExecutor([lookup])
    [up] = asyncio.run(ex.execute([ToolCall("lookup", {"key": "up"}, "c0")]))
    assert up.ok and up.content == "value" and attempts == ["up", "up"]
    [down] = asyncio.run(ex.execute([ToolCall("lookup", {"key": "down"}, "c1")]))
    assert attempts[2:] == ["down"] * 3  # one attempt and two retries
    assert down.error_kind is ToolErrorKind.INFRASTRUCTURE  # not the model's doing: the episode is not trained on
    assert down.content == ("Error (infrastructure): 'lookup' is unavailable: InfrastructureFault: the key-value "
                            "service is down")
    assert ex.error_counts == {"infrastructure": 1}
