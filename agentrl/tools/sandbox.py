"""Run model-written Python in a separate process with hard limits.

Model code must not see host secrets, touch host files or sockets, reach the network, use more
than its share of memory, disk or processes, or outlive its call. Each run is this chain, in a
new session (process group):

    [unshare --net --mount --pid --fork --kill-child --mount-proc -- ]   (when namespaces work)
      python -I -S -c BOOTSTRAP   root in the namespaces: cgroup, minimal root, init, subreaper
        python -I -S -            forked: rlimits, no capabilities, per-run uid, program on stdin

(BOOTSTRAP is `agentrl.tools.sandbox_bootstrap`, sent as source text.)

* Network namespace: only a down loopback device; every connect fails before a packet leaves,
  abstract UNIX sockets of the host included.
* Mount namespace with a minimal root (`sandbox_bootstrap`): system dirs and the interpreter
  read-only, synthetic /etc, a few /dev nodes, a fresh /proc, and one tmpfs of `disk_bytes`
  for /tmp (working dir /tmp/work), /var/tmp and /dev/shm. No host socket, home or project
  file is in it, and the program cannot create user namespaces to mount over it.
* PID namespace: the bootstrap is its init, so when it ends the kernel kills all that is left,
  `setsid()` escapees included.
* A cgroup per call (`sandbox_cgroup`), where the host lets us make one: memory and tasks of
  the whole call, tmpfs files included. Elsewhere memory is bounded per process only.
* Per-run uid (when we are root): 2**31 + a pid-derived slot, not `nobody`. RLIMIT_NPROC counts
  per real uid and is not enforced for root, so this makes the process limit real and per-run;
  concurrent runs cannot signal or read each other; and "kill every process of this uid" is an
  exact cleanup that also works without a pid namespace.
* rlimits, set in the forked child rather than a `preexec_fn` (unsafe in threaded hosts):
  RLIMIT_CPU (SIGXCPU, SIGKILL 1 s later), AS, NPROC, FSIZE, NOFILE, CORE=0; plus an empty
  capability bounding set, PR_SET_NO_NEW_PRIVS, an environment of PATH/LANG/HOME only, and
  `-I -S` (no user site, no PYTHON* variables, no site-packages: standard library only).

Each part is probed once per process and used where it works: `SandboxIsolation.mechanisms()`
says what holds here, logged at the first run; what is missing is logged as a loud warning.
Without a mount namespace the run writes to a host dir and the shared temp dirs, whose use the
host polls (killing the run past `disk_bytes`) and cleans up after; docs/reliability.md lists
what holds on which host.

stdout and stderr are read as they come, each capped at `max_output_bytes`; past the cap, or at
the wall-clock limit, every process of the run is killed with SIGKILL and reaped.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

from agentrl.tools.sandbox_bootstrap import WORKDIR, bootstrap_argv, read_status
from agentrl.tools.sandbox_cgroup import CallCgroup, CgroupPlan, call_cgroup, find_cgroup_plan
from agentrl.tools.sandbox_process import RunScope, outcome, supervise
from agentrl.tools.sandbox_workdir import run_identity

logger = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
_SAFE_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Hard limits of one sandboxed run.

    Attributes:
        cpu_seconds: CPU time of each process (RLIMIT_CPU); SIGXCPU at the limit, SIGKILL 1 s on.
        wall_seconds: Wall-clock limit of the whole run; past it every process is killed.
        memory_bytes: Memory of the whole run where a cgroup is available (past it the kernel
            kills a process of the run), and address space of each process (RLIMIT_AS, so big
            allocations raise MemoryError) everywhere.
        max_processes: Processes of the run's uid (RLIMIT_NPROC), and tasks of its cgroup.
        max_output_bytes: Bytes kept of stdout and of stderr each; more kills the run.
        max_file_bytes: Largest file the code may write (RLIMIT_FSIZE).
        disk_bytes: Bytes the run may write in all: the size of its tmpfs behind /tmp, /var/tmp
            and /dev/shm (writes past it fail with ENOSPC); without a mount namespace, the
            polled use of its working dir and temp files (past it the run is killed).
        network: Allow network access (no network namespace). Off by default.
    """

    cpu_seconds: float = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * MiB
    max_processes: int = 32
    max_output_bytes: int = 64 * KiB
    max_file_bytes: int = 16 * MiB
    disk_bytes: int = 64 * MiB
    network: bool = False

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_output_bytes",
                     "max_file_bytes", "disk_bytes"):
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
        memory_exceeded: The kernel killed a process of the run at the run's cgroup memory limit.
        disk_exceeded: The run wrote more than `disk_bytes` to host dirs and was killed (only
            without a mount namespace; with one, writes past the limit fail inside instead).
        peak_memory_bytes: Most memory the run held at once, from its cgroup (None without one).
    """

    stdout: str
    stderr: str
    exit_code: int | None
    killed_signal: int | None
    timed_out: bool
    output_truncated: bool
    duration_s: float
    memory_exceeded: bool = False
    disk_exceeded: bool = False
    peak_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and not self.timed_out and not self.output_truncated
                and not self.memory_exceeded and not self.disk_exceeded)


@dataclass(frozen=True)
class SandboxIsolation:
    """Which isolation this host gives: see the module docstring and `mechanisms`.

    Attributes:
        private_mounts: A mount namespace with the minimal root (see `sandbox_bootstrap`).
        cgroup: Where per-call cgroups are made, or None: memory is then bounded per process.
        cgroup_note: What the cgroup search found, or why it found nothing.
    """

    network_namespace: bool
    pid_namespace: bool
    private_mounts: bool
    per_run_uid: bool
    cgroup: CgroupPlan | None
    cgroup_note: str
    interpreter: str
    prefix: tuple[str, ...]

    def mechanisms(self) -> list[tuple[str, bool, str]]:
        """(mechanism, active here, what holds with it or is left without it) for each part."""
        c = self.cgroup
        tasks = c is not None and c.pids_parent is not None
        return [
            ("network namespace", self.network_namespace, "no network, no abstract UNIX sockets of the host"
             if self.network_namespace else "the program has the host's network"),
            ("mount namespace, minimal root", self.private_mounts,
             "no host socket or file beyond system dirs; one tmpfs disk quota; no nested user namespaces"
             if self.private_mounts else "host files and sockets reachable with the program's uid; disk use polled"),
            ("pid namespace", self.pid_namespace, "host processes invisible; nothing outlives the call"
             if self.pid_namespace else "the call's processes are swept by uid or process group"),
            ("per-run uid", self.per_run_uid, "a uid of its own: exact process limit and cleanup"
             if self.per_run_uid else "the program runs as the host user, without capabilities"),
            ("cgroup memory limit per call", c is not None,
             self.cgroup_note if c else f"memory bounded per process only ({self.cgroup_note})"),
            ("cgroup task limit per call", tasks, "tasks of the whole call" if tasks else "RLIMIT_NPROC only"),
            ("rlimits, no capabilities, no_new_privs", True, "CPU, address space, file size, open files per process"),
        ]


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

    Each candidate runs `print(6*7)` through the real chain, in a per-call cgroup where one can
    be made (and again without, if none ran with it). What holds is logged once; a partial
    result is logged as a warning naming what is missing and what that allows.

    Raises:
        RuntimeError: Nothing ran, e.g. no Python interpreter the sandbox uid may execute.
    """
    if network in _isolation:
        return _isolation[network]
    plan, note = find_cgroup_plan()
    drop = os.geteuid() == 0
    for cgroup in dict.fromkeys([plan, None]):
        for prefix, pid_ns, mounts in _namespace_variants(network):
            for interpreter in _interpreter_candidates():
                iso = SandboxIsolation(bool(prefix) and not network, pid_ns, mounts, drop, cgroup,
                                       note if cgroup or not plan else "the sandbox could not join its cgroup",
                                       interpreter, prefix)
                try:
                    result = await _run(iso, "print(6*7)", SandboxLimits(wall_seconds=20))
                except (OSError, RuntimeError) as exc:
                    logger.debug("sandbox candidate %s failed: %s", iso, exc)
                    continue
                if result.stdout == "42\n" and result.exit_code == 0:
                    _log_mechanisms(iso, network)
                    return _isolation.setdefault(network, iso)
    raise RuntimeError(
        f"no way to run the Python sandbox here: tried {_interpreter_candidates()} (as root the code "
        "runs under an unprivileged uid, so the interpreter and its standard library must be "
        "world-readable; install python3 in /usr/bin)"
    )


def _log_mechanisms(iso: SandboxIsolation, network: bool) -> None:
    rows = iso.mechanisms()
    logger.info("python sandbox mechanisms: %s", "; ".join(f"{name}: {'yes' if on else 'NO'}" for name, on, _ in rows))
    gaps = [f"no {name}: {why}" for name, on, why in rows if not on and not (network and name == "network namespace")]
    if gaps:
        logger.warning("SANDBOX ISOLATION IS PARTIAL here: %s. See docs/reliability.md for what each gives and "
                       "how to get it (root with a working `unshare`; a delegated cgroup).", "; ".join(gaps))


def _command(iso: SandboxIsolation, workdir: str | None, uid: int | None, limits: SandboxLimits, status_fd: int,
             group: CallCgroup | None) -> list[str]:
    cpu = max(1, math.ceil(limits.cpu_seconds))
    config = {
        "workdir": workdir or WORKDIR, "uid": uid, "status_fd": status_fd, "private_mounts": iso.private_mounts,
        "disk_bytes": limits.disk_bytes, "cgroup_procs": group.procs_files if group else [],
        "interpreter": iso.interpreter, "path": _SAFE_PATH,
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


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process.

    Args:
        code: Program text; it is fed to `python -I -S -` on stdin (the program's own stdin is empty).
        limits: Hard limits of the run.

    Returns:
        The captured output and how the run ended. A crash, a timeout, too much output or memory
        is a result, not an exception.

    Raises:
        RuntimeError: The sandbox itself could not start (an infrastructure fault).

    Example:
        >>> result = asyncio.run(run_python("print(6 * 7)", SandboxLimits(wall_seconds=5)))
        >>> result.stdout, result.exit_code
        ('42\\n', 0)
    """
    return await _run(await sandbox_isolation(limits.network), code, limits)


async def _run(iso: SandboxIsolation, code: str, limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        with run_identity(iso.per_run_uid, host_workdir=not iso.private_mounts) as (workdir, uid), \
                call_cgroup(iso.cgroup, limits.memory_bytes, limits.max_processes + 1) as group:  # + the bootstrap
            argv = _command(iso, workdir, uid, limits, write_fd, group)
            scope = RunScope(uid, group, iso.pid_namespace, workdir)
            fd, write_fd = write_fd, -1  # supervise closes it
            ended = await supervise(argv, code, scope, wall_seconds=limits.wall_seconds, status_fd=fd,
                                    max_output_bytes=limits.max_output_bytes, disk_bytes=limits.disk_bytes)
            status = read_status(read_fd)
            memory_exceeded = group is not None and group.oom_kills() > 0
            peak = group.peak_bytes() if group is not None else None
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if status is not None and status[0] == "setup-failed":
        raise RuntimeError(f"sandbox setup failed: {status[1]}")
    exit_code, killed_signal = outcome(status, ended.returncode, killed=not ended.exited)
    return SandboxResult(
        stdout=ended.stdout.decode("utf-8", errors="replace"),
        stderr=ended.stderr.decode("utf-8", errors="replace"),
        exit_code=exit_code,
        killed_signal=killed_signal,
        timed_out=not (ended.exited or ended.overflow or ended.disk_full),
        output_truncated=ended.truncated,
        duration_s=time.monotonic() - start,
        memory_exceeded=memory_exceeded,
        disk_exceeded=ended.disk_full,
        peak_memory_bytes=peak,
    )
