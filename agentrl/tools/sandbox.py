"""Run model-written Python in a separate process with hard limits.

A model's code must not see host secrets, touch host files, reach the network, or outlive its
call. Each run starts this chain, in a new session (process group):

    [unshare --net --mount --pid --fork --kill-child --mount-proc --]   (when namespaces work)
        python -I -S -c BOOTSTRAP   (root inside the namespaces: mounts, then the init process)
            python -I -S -          (fork: rlimits, per-run uid, reads the program from stdin)

Isolation, strongest first, each part probed once per process and used where it works:

* Network namespace: only a down loopback device, so every connect fails before a packet leaves.
* PID namespace: the bootstrap is its init; when it exits or is killed the kernel kills every
  process left inside, including ones that called `setsid()`, so nothing outlives the run.
* Mount namespace: fresh size-capped tmpfs on /tmp, /var/tmp and /dev/shm (writes to
  world-writable dirs vanish with the run), the per-run working dir bound at /tmp/work, and the
  root mount re-bound read-only.
* Per-run uid: as root we run the code under a uid of its own (2**31 + pid-derived slot).
  RLIMIT_NPROC counts processes per real uid and is not enforced for root, so this makes the
  process limit real and per-run (a shared `nobody` would let concurrent runs starve, signal and
  read one another), and it lets the cleanup kill every process of that uid.
* rlimits (set in the forked child, not in a `preexec_fn`, which is unsafe in threaded hosts):
  RLIMIT_CPU (SIGXCPU at the soft limit, SIGKILL one second later), RLIMIT_AS, RLIMIT_NPROC,
  RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_CORE=0; PR_SET_NO_NEW_PRIVS blocks setuid binaries.
* An empty environment (PATH, LANG, HOME only) and `-I -S` (no user site, no PYTHON* variables,
  no site-packages).

Without namespaces a loud warning is logged once. Then /tmp is shared (a program can leave files
there), and a descendant that calls `setsid()` escapes the group kill unless a per-run uid lets
the uid sweep find it; without root, RLIMIT_NPROC counts all processes of the host user.

stdout and stderr are read incrementally, each capped at `max_output_bytes`; past the cap, or at
the wall-clock limit, the whole group is killed with SIGKILL and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
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

logger = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
_CHUNK = 64 * KiB
_TMPFS_OPTIONS = b"size=64m,mode=1777"
_UID_BASE = 2**31  # far above login, system and systemd container uids
_UID_SLOTS = 256
_SAFE_PATH = "/usr/bin:/bin"

_BOOTSTRAP = r"""# agentrl-sandbox-bootstrap
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
def check(rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))
def report(line):
    os.write(status, (line + "\n").encode())
cwd = cfg["workdir"]
try:
    if cfg["private_mounts"]:
        RDONLY, NOSUID, NODEV, REMOUNT, BIND = 1, 2, 4, 32, 4096
        work = os.open(cwd, os.O_PATH | os.O_DIRECTORY)
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(d) and not os.path.islink(d):
                check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", NOSUID | NODEV, cfg["tmpfs"].encode()), "tmpfs " + d)
        os.mkdir("/tmp/work")
        check(libc.mount(("/proc/self/fd/%d" % work).encode(), b"/tmp/work", None, BIND, None), "bind workdir")
        os.close(work)
        cwd = "/tmp/work"
        # MS_BIND makes this a per-mount flag of our namespace; without it the host fs would go read-only
        libc.mount(None, b"/", None, REMOUNT | BIND | RDONLY, None)  # best effort
except OSError as exc:
    report("setup-failed %s" % exc)
    sys.exit(127)
pid = os.fork()
if pid == 0:
    try:
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
        check(libc.prctl(1, 9, 0, 0, 0), "pdeathsig")  # SIGKILL when the bootstrap dies
        os.chdir(cwd)
        os.set_inheritable(status, False)
        env = {"PATH": cfg["path"], "LANG": "C.UTF-8", "HOME": cwd}
        os.execve(cfg["interpreter"], [cfg["interpreter"], "-I", "-S", "-"], env)
    except BaseException as exc:
        report("setup-failed %s: %s" % (type(exc).__name__, exc))
        os._exit(127)
_, st = os.waitpid(pid, 0)
report("signal %d" % os.WTERMSIG(st) if os.WIFSIGNALED(st) else "exit %d" % os.WEXITSTATUS(st))
"""


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
    """Which isolation this host gives (probed once per process; see `sandbox_isolation`)."""

    network_namespace: bool
    pid_namespace: bool
    private_mounts: bool
    per_run_uid: bool
    interpreter: str
    prefix: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.pid_namespace and self.private_mounts


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
    found = [os.path.realpath(sys.executable)]
    for name in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(name):
            found.append(os.path.realpath(name))
    return list(dict.fromkeys(found))


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
    variants.append(((), False, False))
    return variants


@functools.lru_cache(maxsize=2)
def sandbox_isolation(network: bool = False) -> SandboxIsolation:
    """Probe (once per process and `network` flag) the strongest isolation that runs here.

    Each candidate is tried end to end: the real command chain runs `print(6*7)`.

    Raises:
        RuntimeError: No candidate ran, e.g. no Python interpreter the sandbox uid may execute.
    """
    drop = os.geteuid() == 0
    for prefix, pid_ns, mounts in _namespace_variants(network):
        for interpreter in _interpreter_candidates():
            iso = SandboxIsolation(bool(prefix) and not network, pid_ns, mounts, drop, interpreter, prefix)
            if _probe(iso):
                if not iso.complete or (not network and not iso.network_namespace):
                    logger.warning(
                        "SANDBOX ISOLATION IS PARTIAL on this host (%s): model code may %s. Run as root "
                        "with working `unshare` (Linux namespaces) for full isolation.",
                        iso, "reach the network, leave files in /tmp or leave setsid() processes behind"
                        if not prefix else "leave files in /tmp or leave setsid() processes behind",
                    )
                return iso
    raise RuntimeError(
        f"no way to run the Python sandbox here: tried interpreters {_interpreter_candidates()} "
        "(as root the code runs under an unprivileged uid, so the interpreter and its standard "
        "library must be world-readable; install python3 in /usr/bin)"
    )


def _probe(iso: SandboxIsolation) -> bool:
    read_fd, write_fd = os.pipe()
    try:
        with _private_workdir(iso.per_run_uid) as (workdir, uid):
            argv = _command(iso, workdir, uid, SandboxLimits(), write_fd)
            try:
                done = subprocess.run(argv, input=b"print(6*7)", capture_output=True, timeout=20, env=_host_env(),
                                      cwd="/", start_new_session=True, pass_fds=(write_fd,))
            except (OSError, subprocess.TimeoutExpired):
                return False
            finally:
                os.close(write_fd)
                write_fd = -1
                _kill_uid(uid)
            status = _read_status(read_fd)
            ok = done.returncode == 0 and done.stdout.strip() == b"42" and status == ("exit", 0)
            if not ok:
                logger.debug("sandbox probe %s failed: rc=%s status=%s stderr=%r", iso, done.returncode, status, done.stderr[-500:])
            return ok
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _host_env() -> dict[str, str]:
    return {"PATH": _SAFE_PATH, "LANG": "C.UTF-8"}


def _command(iso: SandboxIsolation, workdir: str, uid: int | None, limits: SandboxLimits, status_fd: int) -> list[str]:
    cpu = max(1, math.ceil(limits.cpu_seconds))
    config = {
        "workdir": workdir,
        "uid": uid,
        "status_fd": status_fd,
        "private_mounts": iso.private_mounts,
        "tmpfs": _TMPFS_OPTIONS.decode(),
        "interpreter": iso.interpreter,
        "path": _SAFE_PATH,
        "rlimits": [
            ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes),
            ("RLIMIT_NOFILE", 256, 256),
            ("RLIMIT_CORE", 0, 0),
        ],
    }
    return [*iso.prefix, iso.interpreter, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)]


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
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _uids.release(uid)


def _read_status(read_fd: int) -> tuple[str, int] | tuple[str, str] | None:
    """The bootstrap's report: ("exit", code), ("signal", signum), ("setup-failed", why) or None."""
    os.set_blocking(read_fd, False)
    try:
        text = os.read(read_fd, 4096).decode(errors="replace")
    except BlockingIOError:
        return None
    for line in text.splitlines():
        kind, _, value = line.partition(" ")
        if kind == "setup-failed":
            return kind, value
        if kind in ("exit", "signal") and value.lstrip("-").isdigit():
            return kind, int(value)
    return None


def _live_pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int | None) -> None:
    """SIGKILL every process of the run's own uid until none is left (no-op without one)."""
    if uid is None:
        return
    for _ in range(200):
        pids = _live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    logger.error("sandbox uid %d still has processes after repeated SIGKILL", uid)


def _kill_all(pgid: int, uid: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _kill_uid(uid)


class _CappedBuffer:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> bool:
        """Keep at most `cap` bytes in all; False once more than that arrived."""
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        self.truncated = len(chunk) > room
        return not self.truncated


async def _pump(stream: asyncio.StreamReader, buf: _CappedBuffer, overflow: asyncio.Event) -> None:
    while chunk := await stream.read(_CHUNK):
        if not buf.add(chunk):
            overflow.set()
            return


async def _feed(stdin: asyncio.StreamWriter, code: str) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(code.encode("utf-8", errors="replace"))
        await stdin.drain()
        stdin.close()


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
    iso = await asyncio.to_thread(sandbox_isolation, limits.network)
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        with _private_workdir(iso.per_run_uid) as (workdir, uid):
            proc = await asyncio.create_subprocess_exec(
                *_command(iso, workdir, uid, limits, write_fd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=_host_env(), cwd="/", start_new_session=True, pass_fds=(write_fd,),
            )
            os.close(write_fd)
            write_fd = -1
            try:
                out, err, timed_out, killed = await _supervise(proc, code, limits, uid)
            finally:
                _kill_all(proc.pid, uid)  # also when cancelled by the caller's own timeout
            status = _read_status(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if status is not None and status[0] == "setup-failed":
        raise RuntimeError(f"sandbox setup failed: {status[1]}")
    exit_code, killed_signal = _outcome(status, proc.returncode, killed)
    return SandboxResult(
        stdout=out.data.decode("utf-8", errors="replace"),
        stderr=err.data.decode("utf-8", errors="replace"),
        exit_code=exit_code,
        killed_signal=killed_signal,
        timed_out=timed_out,
        output_truncated=out.truncated or err.truncated,
        duration_s=time.monotonic() - start,
    )


async def _supervise(
    proc: asyncio.subprocess.Process, code: str, limits: SandboxLimits, uid: int | None
) -> tuple[_CappedBuffer, _CappedBuffer, bool, bool]:
    """Feed the code, read both streams under the cap, and kill at the deadline or the cap.

    Returns (stdout, stderr, timed_out, killed_by_us).
    """
    assert proc.stdin and proc.stdout and proc.stderr
    out, err = _CappedBuffer(limits.max_output_bytes), _CappedBuffer(limits.max_output_bytes)
    overflow = asyncio.Event()
    pumps = [asyncio.create_task(_pump(proc.stdout, out, overflow)), asyncio.create_task(_pump(proc.stderr, err, overflow))]
    feeder = asyncio.create_task(_feed(proc.stdin, code))
    exited = asyncio.create_task(proc.wait())
    overflowed = asyncio.create_task(overflow.wait())
    try:
        done, _ = await asyncio.wait({exited, overflowed}, timeout=limits.wall_seconds, return_when=asyncio.FIRST_COMPLETED)
        killed = exited not in done
        # Kill even after a clean exit: background children must not outlive the run.
        _kill_all(proc.pid, uid)
        await proc.wait()
        await asyncio.wait(pumps, timeout=1.0)  # drain what is still in the pipes
        return out, err, not done, killed
    finally:
        for task in (*pumps, feeder, exited, overflowed):
            task.cancel()


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
