"""One running sandbox chain, seen from the host: start it, feed it, watch its limits, kill it.

`agentrl.tools.sandbox` builds the command line and reads the result; this module owns the
process: stdout and stderr read as they come and capped, the wall clock, the polled disk use
(only without a mount namespace), and the kill of every process of the run afterwards, by its
process group, its cgroup and its uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass

from agentrl.tools.sandbox_cgroup import CallCgroup
from agentrl.tools.sandbox_workdir import disk_bytes_used, kill_uid

DISK_POLL_S = 0.05
_HOST_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class RunScope:
    """What names every process of one run, for the kill after it.

    Attributes:
        uid: The run's own uid (None without root).
        group: The run's cgroup (None without one).
        pid_namespace: The run has a pid namespace (its init's death ends every process of it).
        workdir: The host dir to poll for disk use (None: the run's files are on its own tmpfs).
    """

    uid: int | None
    group: CallCgroup | None
    pid_namespace: bool
    workdir: str | None


@dataclass(frozen=True)
class Ended:
    """How the chain ended: which of its futures settled, what it printed, its own exit status."""

    exited: bool
    overflow: bool
    disk_full: bool
    stdout: bytes
    stderr: bytes
    truncated: bool
    returncode: int | None


class _Collector(asyncio.SubprocessProtocol):
    """Keeps the first `cap` bytes of stdout and of stderr; later bytes are read and dropped.

    Dropping (not pausing) keeps the pipes draining, so EOF and `connection_lost` arrive as soon
    as every writer is dead.
    """

    def __init__(self, cap: int) -> None:
        loop = asyncio.get_running_loop()
        self.data = {1: bytearray(), 2: bytearray()}
        self.cap = cap
        self.truncated = False
        self.overflow = loop.create_future()
        self.exited = loop.create_future()
        self.closed = loop.create_future()
        self.disk_full = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self.data[fd]
        room = self.cap - len(buf)
        buf += data[: max(room, 0)]
        if len(data) > room:
            self.truncated = True
            _settle(self.overflow)

    def process_exited(self) -> None:
        _settle(self.exited)

    def connection_lost(self, exc: Exception | None) -> None:
        _settle(self.closed)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def _watch_disk(workdir: str, uid: int | None, limit: int, full: asyncio.Future) -> None:
    """Poll the run's disk use, settle `full` past `limit`."""
    while not full.done():
        await asyncio.sleep(DISK_POLL_S)
        if await asyncio.to_thread(disk_bytes_used, workdir, uid) > limit:
            _settle(full)


async def supervise(argv: list[str], code: str, scope: RunScope, *, wall_seconds: float, max_output_bytes: int,
                    disk_bytes: int, status_fd: int) -> Ended:
    """Start `argv`, feed it `code`, wait for its end or a limit, then kill every process of the run.

    `status_fd` is passed to the child and closed here once the child holds it.
    """
    loop = asyncio.get_running_loop()
    try:
        transport, collector = await loop.subprocess_exec(
            lambda: _Collector(max_output_bytes), *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=_HOST_ENV, cwd="/", start_new_session=True, pass_fds=(status_fd,),
        )
    finally:
        os.close(status_fd)
    watcher = None if scope.workdir is None else asyncio.ensure_future(
        _watch_disk(scope.workdir, scope.uid, disk_bytes, collector.disk_full))
    try:
        stdin = transport.get_pipe_transport(0)
        stdin.write(code.encode("utf-8", errors="replace"))  # buffered by the loop as the child reads
        stdin.write_eof()
        done, _ = await asyncio.wait({collector.exited, collector.overflow, collector.disk_full},
                                     timeout=wall_seconds, return_when=asyncio.FIRST_COMPLETED)
        await _stop(transport, collector, scope)
    finally:
        if watcher is not None:
            watcher.cancel()
        _kill_all(transport, scope)  # also when the caller's own timeout cancels us
        transport.close()
    return Ended(collector.exited in done, collector.overflow in done, collector.disk_full in done,
                 bytes(collector.data[1]), bytes(collector.data[2]), collector.truncated, transport.get_returncode())


def _kill_all(transport: asyncio.SubprocessTransport, scope: RunScope) -> None:
    """Kill the process group, the cgroup and the uid.

    Once the group leader is reaped its pid may be reused, so the group is then killed only in
    the one mode that needs it (no pid namespace, no per-run uid: the group is all we know).
    """
    if transport.get_returncode() is None or not (scope.pid_namespace or scope.uid is not None):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(transport.get_pid(), signal.SIGKILL)
    if scope.group is not None:
        scope.group.kill()
    kill_uid(scope.uid)


async def _stop(transport: asyncio.SubprocessTransport, collector: _Collector, scope: RunScope) -> None:
    """Kill every process of the run, even after a clean exit: background children must not outlive it.

    The uid sweep goes first so that the bootstrap, a child subreaper, reaps the dead and exits;
    killing the group first would hand orphaned zombies to the host's init where there is no pid
    namespace. The group kill is the last resort.
    """
    kill_uid(scope.uid)
    if scope.uid is not None:
        await asyncio.wait({collector.exited}, timeout=2.0)
    _kill_all(transport, scope)
    await asyncio.wait({collector.closed}, timeout=2.0)  # drain what is left in the pipes


def outcome(status: tuple | None, returncode: int | None, killed: bool) -> tuple[int | None, int | None]:
    """(exit_code, killed_signal) from the bootstrap's report, else from the process itself."""
    if killed:
        return None, int(signal.SIGKILL)
    if status is not None:
        kind, value = status
        return (value, None) if kind == "exit" else (None, value)
    if returncode is not None and returncode < 0:
        return None, -returncode
    return returncode, None
