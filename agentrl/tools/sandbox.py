"""Run model-written Python in a separate process with hard limits.

Model code must not see host secrets, touch host files, reach the network, or outlive its call.
Each run is this chain, in a new session (process group):

    [unshare --net --mount --pid --fork --kill-child --mount-proc --]    (when namespaces work)
      python -I -S -c BOOTSTRAP   root in the namespaces: mounts, then init and child subreaper
        python -I -S -            forked: rlimits, per-run uid, program read from stdin

(BOOTSTRAP is `agentrl.tools.sandbox_bootstrap`, sent as source text.)

* Network namespace: only a down loopback device; every connect fails before a packet leaves.
* PID namespace: the bootstrap is its init, so when it ends the kernel kills all that is left,
  `setsid()` escapees included.
* Mount namespace: private size-capped tmpfs on /tmp, /var/tmp and /dev/shm (writes there vanish
  with the run), the per-run working dir bound at /tmp/work, the root mount re-bound read-only.
* Per-run uid (when we are root): 2**31 + a pid-derived slot, not `nobody`. RLIMIT_NPROC counts
  per real uid and is not enforced for root, so this makes the process limit real and per-run;
  concurrent runs cannot signal or read each other; and "kill every process of this uid" is an
  exact cleanup that also works without a pid namespace.
* rlimits, set in the forked child rather than a `preexec_fn` (unsafe in threaded hosts):
  RLIMIT_CPU (SIGXCPU, SIGKILL 1 s later), AS, NPROC, FSIZE, NOFILE, CORE=0; plus
  PR_SET_NO_NEW_PRIVS, an environment of PATH/LANG/HOME only, and `-I -S` (no user site,
  no PYTHON* variables, no site-packages: standard library only).

Each part is probed once per process and used where it works; what is missing is logged once as
a loud warning. Without a mount namespace /tmp is shared; without root the code has the host
user's file permissions and RLIMIT_NPROC counts all of that user's processes (inside a user
namespace, on kernels >= 5.14, only the namespace's). Never isolated: world-readable host files
stay readable (the root is re-bound read-only, not replaced by a minimal one).

stdout and stderr are read as they come, each capped at `max_output_bytes`; past the cap, or at
the wall-clock limit, every process of the run is killed with SIGKILL and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from agentrl.tools.sandbox_bootstrap import bootstrap_argv, live_pids_of_uid, read_status

logger = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
_TMPFS_OPTIONS = "size=64m,mode=1777"
_UID_BASE = 2**31  # far above login, system and systemd container uids
_UID_SLOTS = 256
_SAFE_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Hard limits of one sandboxed run.

    Attributes:
        cpu_seconds: CPU time of each process (RLIMIT_CPU); SIGXCPU at the limit, SIGKILL 1 s on.
        wall_seconds: Wall-clock limit of the whole run; past it every process is killed.
        memory_bytes: Address space of each process (RLIMIT_AS); big allocations raise MemoryError.
        max_processes: Processes of the run's uid (RLIMIT_NPROC); see the module docstring.
        max_output_bytes: Bytes kept of stdout and of stderr each; more kills the run.
        max_file_bytes: Largest file the code may write (RLIMIT_FSIZE).
        network: Allow network access (no network namespace). Off by default.
    """

    cpu_seconds: float = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * MiB
    max_processes: int = 32
    max_output_bytes: int = 64 * KiB
    max_file_bytes: int = 16 * MiB
    network: bool = False

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_output_bytes", "max_file_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced.

    Attributes:
        stdout: Captured stdout, decoded as UTF-8 with invalid bytes replaced.
        stderr: Captured stderr, decoded the same way.
        exit_code: The program's exit status, or None when a signal ended it.
        killed_signal: The signal that ended the program (SIGKILL when the sandbox killed it).
        timed_out: The wall-clock limit was reached.
        output_truncated: stdout or stderr passed `max_output_bytes`; the run was killed there.
        duration_s: Wall-clock seconds from start to the end of cleanup.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    killed_signal: int | None
    timed_out: bool
    output_truncated: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_truncated


@dataclass(frozen=True)
class SandboxIsolation:
    """Which isolation this host gives: see the module docstring and `sandbox_isolation`."""

    network_namespace: bool
    pid_namespace: bool
    private_mounts: bool
    per_run_uid: bool
    interpreter: str
    prefix: tuple[str, ...]


class _UidPool:
    """Hands out uids that no other run, in this process or another, holds at the same time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def acquire(self) -> int:
        with self._lock:
            slot = next((s for s in range(_UID_SLOTS) if s not in self._used), None)
            if slot is None:
                raise RuntimeError(f"more than {_UID_SLOTS} sandbox runs at once in one process")
            self._used.add(slot)
        return _UID_BASE + (os.getpid() % 2**22) * _UID_SLOTS + slot

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.discard((uid - _UID_BASE) % _UID_SLOTS)


_uids = _UidPool()


def _interpreter_candidates() -> list[str]:
    found = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)]
    return list(dict.fromkeys(os.path.realpath(p) for p in found))


def _namespace_variants(network: bool) -> list[tuple[tuple[str, ...], bool, bool]]:
    """(argv prefix, pid namespace, private mounts), strongest first; the last is no namespaces."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    variants: list[tuple[tuple[str, ...], bool, bool]] = []
    if unshare:
        base = (unshare,) + (() if os.geteuid() == 0 else ("--user", "--map-root-user"))
        net = () if network else ("--net",)
        variants.append((base + net + ("--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--"), True, True))
        variants.append((base + net + ("--mount", "--"), False, True))
        if net:
            variants.append((base + net + ("--",), False, False))
    return variants + [((), False, False)]


_isolation: dict[bool, SandboxIsolation] = {}


async def sandbox_isolation(network: bool = False) -> SandboxIsolation:
    """The strongest isolation that works here, probed once per process and `network` flag.

    Each candidate runs `print(6*7)` through the real chain. A partial result is logged once as a
    warning naming what is missing and what that allows.

    Raises:
        RuntimeError: Nothing ran, e.g. no Python interpreter the sandbox uid may execute.
    """
    if network in _isolation:
        return _isolation[network]
    drop = os.geteuid() == 0
    for prefix, pid_ns, mounts in _namespace_variants(network):
        for interpreter in _interpreter_candidates():
            iso = SandboxIsolation(bool(prefix) and not network, pid_ns, mounts, drop, interpreter, prefix)
            try:
                result = await _run(iso, "print(6*7)", SandboxLimits(wall_seconds=20))
            except (OSError, RuntimeError) as exc:
                logger.debug("sandbox candidate %s failed: %s", iso, exc)
                continue
            if result.stdout == "42\n" and result.exit_code == 0:
                _warn_if_partial(iso, network)
                return _isolation.setdefault(network, iso)
    raise RuntimeError(
        f"no way to run the Python sandbox here: tried {_interpreter_candidates()} (as root the code "
        "runs under an unprivileged uid, so the interpreter and its standard library must be "
        "world-readable; install python3 in /usr/bin)"
    )


def _warn_if_partial(iso: SandboxIsolation, network: bool) -> None:
    gaps = [why for ok, why in (
        (iso.network_namespace or network, "no network namespace: the code can reach the network"),
        (iso.pid_namespace or iso.per_run_uid, "no pid namespace: setsid() descendants can outlive the run"),
        (iso.private_mounts, "no mount namespace: the code can leave files in /tmp"),
        (iso.per_run_uid, "not root: the code runs with the host user's file permissions"),
    ) if not ok]
    if gaps:
        logger.warning("SANDBOX ISOLATION IS PARTIAL here (%s). Run as root with a working `unshare` "
                       "(Linux namespaces) for full isolation.", "; ".join(gaps))


def _command(iso: SandboxIsolation, workdir: str, uid: int | None, limits: SandboxLimits, status_fd: int) -> list[str]:
    cpu = max(1, math.ceil(limits.cpu_seconds))
    config = {
        "workdir": workdir, "uid": uid, "status_fd": status_fd, "private_mounts": iso.private_mounts,
        "tmpfs": _TMPFS_OPTIONS, "interpreter": iso.interpreter, "path": _SAFE_PATH,
        "rlimits": [
            ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes),
            ("RLIMIT_NOFILE", 256, 256),
            ("RLIMIT_CORE", 0, 0),
        ],
    }
    return bootstrap_argv(iso.prefix, iso.interpreter, config)


@contextlib.contextmanager
def _private_workdir(per_run_uid: bool) -> Iterator[tuple[str, int | None]]:
    """A fresh 0700 directory owned by a fresh uid (when root); removed with its contents after."""
    uid = _uids.acquire() if per_run_uid else None
    workdir = tempfile.mkdtemp(prefix="agentrl-sandbox-")
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        yield workdir, uid
    finally:
        _kill_uid(uid)  # covers a cancellation that came before the run's own cleanup
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _uids.release(uid)


def _kill_uid(uid: int | None) -> None:
    """SIGKILL every process of the run's own uid until none is left (no-op without one)."""
    for _ in range(200 if uid is not None else 0):
        pids = live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    if uid is not None:
        logger.error("sandbox uid %d still has processes after repeated SIGKILL", uid)


def _kill_all(transport: asyncio.SubprocessTransport, iso: SandboxIsolation, uid: int | None) -> None:
    """Kill the group and sweep the uid.

    Once the group leader is reaped its pid may be reused, so the group is then killed only in
    the one mode that needs it (no pid namespace, no per-run uid: the group is all we know).
    """
    if transport.get_returncode() is None or not (iso.pid_namespace or uid is not None):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(transport.get_pid(), signal.SIGKILL)
    _kill_uid(uid)


def _host_env() -> dict[str, str]:
    return {"PATH": _SAFE_PATH, "LANG": "C.UTF-8"}


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


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process.

    Args:
        code: Program text; it is fed to `python -I -S -` on stdin (the program's own stdin is empty).
        limits: Hard limits of the run.

    Returns:
        The captured output and how the run ended. A crash, a timeout or too much output is a
        result, not an exception.

    Raises:
        RuntimeError: The sandbox itself could not start (an infrastructure fault).

    Example:
        >>> result = asyncio.run(run_python("print(6 * 7)", SandboxLimits(wall_seconds=5)))
        >>> result.stdout, result.exit_code
        ('42\\n', 0)
    """
    return await _run(await sandbox_isolation(limits.network), code, limits)


async def _run(iso: SandboxIsolation, code: str, limits: SandboxLimits) -> SandboxResult:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        with _private_workdir(iso.per_run_uid) as (workdir, uid):
            transport, collector = await loop.subprocess_exec(
                lambda: _Collector(limits.max_output_bytes), *_command(iso, workdir, uid, limits, write_fd),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_host_env(), cwd="/",
                start_new_session=True, pass_fds=(write_fd,),
            )
            os.close(write_fd)
            write_fd = -1
            try:
                stdin = transport.get_pipe_transport(0)
                stdin.write(code.encode("utf-8", errors="replace"))  # buffered by the loop as the child reads
                stdin.write_eof()
                done, _ = await asyncio.wait({collector.exited, collector.overflow}, timeout=limits.wall_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                await _stop(transport, collector, iso, uid)
            finally:
                _kill_all(transport, iso, uid)  # also when the caller's own timeout cancels us
                transport.close()
            status = read_status(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if status is not None and status[0] == "setup-failed":
        raise RuntimeError(f"sandbox setup failed: {status[1]}")
    killed = collector.exited not in done
    exit_code, killed_signal = _outcome(status, transport.get_returncode(), killed)
    return SandboxResult(
        stdout=collector.data[1].decode("utf-8", errors="replace"),
        stderr=collector.data[2].decode("utf-8", errors="replace"),
        exit_code=exit_code,
        killed_signal=killed_signal,
        timed_out=not done,
        output_truncated=collector.truncated,
        duration_s=time.monotonic() - start,
    )


async def _stop(transport: asyncio.SubprocessTransport, collector: _Collector, iso: SandboxIsolation, uid: int | None) -> None:
    """Kill every process of the run, even after a clean exit: background children must not outlive it.

    The uid sweep goes first so that the bootstrap, a child subreaper, reaps the dead and exits;
    killing the group first would hand orphaned zombies to the host's init where there is no pid
    namespace. The group kill is the last resort.
    """
    _kill_uid(uid)
    if uid is not None:
        await asyncio.wait({collector.exited}, timeout=2.0)
    _kill_all(transport, iso, uid)
    await asyncio.wait({collector.closed}, timeout=2.0)  # drain what is left in the pipes


def _outcome(status: tuple | None, returncode: int | None, killed: bool) -> tuple[int | None, int | None]:
    """(exit_code, killed_signal) from the bootstrap's report, else from the process itself."""
    if killed:
        return None, int(signal.SIGKILL)
    if status is not None:
        kind, value = status
        return (value, None) if kind == "exit" else (None, value)
    if returncode is not None and returncode < 0:
        return None, -returncode
    return returncode, None
