"""The builtin `python` tool: run a model's program in the sandbox and return what it printed.

Choices a model meets:
* A program that prints too much raises `ToolError(OUTPUT_TOO_LARGE)` whose message carries the
  first characters of the output and asks for a summary, rather than returning silently cut
  output the model could mistake for the whole answer.
* A program that runs past the wall-clock limit raises `ToolError(TIMEOUT)`.
* A program that fails (non-zero exit, exception, signal) is a normal result: stdout, then a
  marker line, then the tail of stderr, so the model can read its own traceback and fix it.
  A limit that killed it (CPU, the call's memory, disk) is named in the marker line.
* A sandbox that cannot start is an `InfrastructureFault` (retried by the executor's policy),
  with a message that names no host path.
"""

from __future__ import annotations

import logging
import signal

from agentrl.errors import ToolError, ToolErrorKind
from agentrl.tools.core import Tool, ToolPolicy, tool
from agentrl.tools.executor import InfrastructureFault
from agentrl.tools.sandbox import MiB, SandboxLimits, SandboxResult, run_python

logger = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 2000
TRUNCATED_HEAD_CHARS = 500


def format_result(result: SandboxResult, limits: SandboxLimits = SandboxLimits()) -> str:
    """stdout, plus a status line and the stderr tail when the program did not exit cleanly.

    A limit the sandbox enforced by killing (CPU, the call's memory, disk without a mount
    namespace) is named in the status line, so the model can tell it from its own crash.
    """
    mib = lambda n: f"{n / MiB:g} MiB"  # noqa: E731
    if result.memory_exceeded:
        hint = f" (this call's memory limit of {mib(limits.memory_bytes)} was reached)"
    elif result.disk_exceeded:
        hint = f" (the program wrote more than {mib(limits.disk_bytes)} of files)"
    elif result.killed_signal == signal.SIGXCPU:
        hint = " (CPU time limit reached)"
    else:
        hint = ""
    if result.exit_code == 0:
        # a process of the call was killed at the memory limit, but the program went on
        return result.stdout + (f"[a process was killed{hint}]\n" if hint else "")
    if result.killed_signal is not None:
        try:
            name = signal.Signals(result.killed_signal).name
        except ValueError:
            name = f"signal {result.killed_signal}"
        status = f"[killed by {name}{hint}]"
    else:
        status = f"[exit code {result.exit_code}{hint}]"
    parts = [result.stdout.rstrip("\n"), status, result.stderr[-STDERR_TAIL_CHARS:].rstrip("\n")]
    return "\n".join(p for p in parts if p)


def make_python_tool(limits: SandboxLimits = SandboxLimits()) -> Tool:
    """Build a `python` tool bound to `limits` (the executor's timeout leaves room for cleanup)."""

    async def python(code: str) -> str:
        """Run a Python 3 program and return what it printed to stdout.

        Each call runs in a fresh, isolated process: no network, no state kept between calls,
        standard library only, files only in its working directory and /tmp (small and
        private). Print the values you need; on failure the end of stderr is shown.

        Args:
            code: A complete Python program, e.g. "print(sum(range(10)))".
        """
        try:
            result = await run_python(code, limits)
        except RuntimeError as exc:
            logger.error("python sandbox could not start: %s", exc)
            raise InfrastructureFault("the sandbox could not start") from None
        if result.timed_out:
            raise ToolError(ToolErrorKind.TIMEOUT, f"the program did not finish within {limits.wall_seconds:g} s; do less work per call or make it faster")
        if result.output_truncated:
            head = result.stdout[:TRUNCATED_HEAD_CHARS]
            raise ToolError(
                ToolErrorKind.OUTPUT_TOO_LARGE,
                f"the program printed more than {limits.max_output_bytes} bytes and was stopped; print a "
                f"summary instead. Its output began with:\n{head}",
            )
        return format_result(result, limits)

    return tool(python, policy=ToolPolicy(timeout_s=limits.wall_seconds + 5.0))


python_tool = make_python_tool()
