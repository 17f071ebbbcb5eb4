"""Per-call memory and process limits for the Python sandbox, from a cgroup made for each call.

rlimits bound each process (RLIMIT_AS), so a call of N processes may hold N times the limit. A
cgroup bounds the call as a whole: the memory of all its processes and of the files it writes to
tmpfs (memory.max / memory.limit_in_bytes; past it the kernel kills a process of the call, not of
the host) and its number of tasks (pids.max). Each call gets a fresh child cgroup named
`agentrl-<host pid>-<n>`; the bootstrap joins it before it forks the program, and the host kills
what is left in it and removes it after the call.

Where the cgroup is made, first that works:

1. `AGENTRL_SANDBOX_CGROUP`, a cgroup v2 directory an operator delegated to us (memory, and
   ideally pids, enabled in its `cgroup.subtree_control`). Set but unusable is an error.
2. cgroup v2: our own cgroup, if memory is (or can be) enabled for its children. The kernel
   allows that only where the cgroup holds no process, i.e. at the real root, or where systemd
   or the container runtime delegated an empty subtree: see docs/reliability.md for the setup.
3. cgroup v1 (hybrid hosts): our own memory cgroup and pids cgroup, where we may make children.

Without any, the sandbox still runs, and says so: memory is then bounded per process only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from agentrl.tools.sandbox_workdir import kill_until_gone

ENV_VAR = "AGENTRL_SANDBOX_CGROUP"
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupPlan:
    """Where each call's cgroups are made.

    Attributes:
        version: 1 or 2.
        memory_parent: Directory under which each call's memory cgroup is made (v2: its only one).
        pids_parent: Directory for the call's pids cgroup (v1's pids hierarchy; v2: the same as
            `memory_parent` when pids is enabled there), or None: no per-call task limit.
    """

    version: int
    memory_parent: str
    pids_parent: str | None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _hierarchies() -> dict[str, str]:
    """{controller (or "" for cgroup2): the directory of this process's cgroup in that hierarchy}."""
    own: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    found: dict[str, str] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        root, point = fields[3], fields[4]
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        names = [""] if fstype == "cgroup2" else [o for o in options if o in own] if fstype == "cgroup" else []
        for name in names:
            path = own.get(name, "/")
            # the mount shows the hierarchy from `root` down; a path outside it (no cgroup namespace
            # in a container) means the mount point itself is our view of it
            rel = path[len(root):] if path.startswith(root) else ""
            inside = os.path.normpath(os.path.join(point, rel.lstrip("/")))
            found[name] = inside if os.path.isdir(inside) else point
    return found


def _can_make_child(parent: str, limit_file: str, value: str) -> bool:
    probe = os.path.join(parent, f"agentrl-{os.getpid()}-probe")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        _write(os.path.join(probe, limit_file), value)
        return True
    except OSError:
        return False
    finally:
        os.rmdir(probe)


def _v2_plan(base: str) -> tuple[CgroupPlan | None, str]:
    available = _read(os.path.join(base, "cgroup.controllers")).split()
    if "memory" not in available:
        return None, f"cgroup v2 at {base} has no memory controller available"
    enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
    wanted = [c for c in ("memory", "pids") if c in available and c not in enabled]
    if wanted:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
        except OSError as exc:
            return None, (f"cgroup v2: cannot enable {'+'.join(wanted)} for the children of {base} ({exc.strerror}: "
                          f"a cgroup that holds processes cannot); set {ENV_VAR} to a delegated cgroup")
    if not _can_make_child(base, "memory.max", "max"):
        return None, f"cgroup v2: cannot make a child cgroup with a memory limit in {base}"
    pids = base if "pids" in _read(os.path.join(base, "cgroup.subtree_control")).split() else None
    return CgroupPlan(2, base, pids), f"cgroup v2 under {base}"


def find_cgroup_plan() -> tuple[CgroupPlan | None, str]:
    """Where per-call cgroups can be made here, and a line saying what was found or why none.

    Raises:
        RuntimeError: `AGENTRL_SANDBOX_CGROUP` is set but is not a usable cgroup v2 directory.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        try:
            plan, why = _v2_plan(explicit)
        except OSError as exc:
            plan, why = None, f"{exc.strerror}: {exc.filename}"
        if plan is None:
            raise RuntimeError(f"{ENV_VAR}={explicit} is not a usable delegated cgroup v2 directory ({why}); "
                               "unset it to let the sandbox look for one itself")
        return _remove_stale(plan), why
    try:
        hierarchies = _hierarchies()
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    reasons = []
    if "" in hierarchies:
        plan, why = _v2_plan(hierarchies[""])
        if plan is not None:
            return _remove_stale(plan), why
        reasons.append(why)
    if "memory" in hierarchies:
        memory = hierarchies["memory"]
        if _can_make_child(memory, "memory.limit_in_bytes", str(1 << 30)):
            pids = hierarchies.get("pids")
            pids = pids if pids and _can_make_child(pids, "pids.max", "max") else None
            return _remove_stale(CgroupPlan(1, memory, pids)), f"cgroup v1 under {memory}" + (f" and {pids}" if pids else "")
        reasons.append(f"cgroup v1: cannot make a child cgroup in {memory}")
    return None, "; ".join(reasons) or "no cgroup memory controller is mounted"


def _remove_stale(plan: CgroupPlan) -> CgroupPlan:
    """Remove the empty call cgroups of host processes that are gone (killed mid-call)."""
    for parent in {plan.memory_parent, plan.pids_parent} - {None}:
        for name in os.listdir(parent):
            owner = name.split("-")[1] if name.startswith("agentrl-") and name.count("-") == 2 else ""
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))
    return plan


class CallCgroup:
    """One call's cgroups (memory, and pids where there is one), made with their limits."""

    def __init__(self, plan: CgroupPlan, memory_bytes: int, max_tasks: int) -> None:
        name = f"agentrl-{os.getpid()}-{next(_counter)}"
        self.plan = plan
        self.memory = os.path.join(plan.memory_parent, name)
        self.pids = os.path.join(plan.pids_parent, name) if plan.pids_parent else None
        self.dirs = list(dict.fromkeys(d for d in (self.memory, self.pids) if d))
        for d in self.dirs:
            os.mkdir(d)
        try:
            self._set_limits(memory_bytes, max_tasks)
        except OSError:
            self.remove()
            raise

    def _set_limits(self, memory_bytes: int, max_tasks: int) -> None:
        if self.plan.version == 2:
            _write(os.path.join(self.memory, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(self.memory, "memory.swap.max")):
                _write(os.path.join(self.memory, "memory.swap.max"), "0")
        else:
            _write(os.path.join(self.memory, "memory.limit_in_bytes"), str(memory_bytes))
            with contextlib.suppress(OSError):  # memory+swap exists only with swap accounting on
                _write(os.path.join(self.memory, "memory.memsw.limit_in_bytes"), str(memory_bytes))
        if self.pids:
            _write(os.path.join(self.pids, "pids.max"), str(max_tasks))

    @property
    def procs_files(self) -> list[str]:
        """The files the bootstrap writes itself into, before it forks the program."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def pids_inside(self) -> list[int]:
        out: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in _read(path).split())
        return sorted(out)

    def kill(self) -> None:
        """SIGKILL every process in the call's cgroups until none is left."""
        kill_until_gone(self.pids_inside, f"cgroup {self.memory}")

    def _counter_value(self, name: str, key: str) -> int:
        with contextlib.suppress(OSError):
            for line in _read(os.path.join(self.memory, name)).splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        return 0

    def oom_kills(self) -> int:
        """Processes the kernel killed at the call's memory limit."""
        return self._counter_value("memory.events" if self.plan.version == 2 else "memory.oom_control", "oom_kill")

    def peak_bytes(self) -> int | None:
        """Most memory the call held at once (None where the kernel does not record it)."""
        name = "memory.peak" if self.plan.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(_read(os.path.join(self.memory, name)))
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """Kill what is left and remove the cgroups (a dying process may hold them a moment)."""
        self.kill()
        for d in self.dirs:
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


@contextlib.contextmanager
def call_cgroup(plan: CgroupPlan | None, memory_bytes: int, max_tasks: int) -> Iterator[CallCgroup | None]:
    """A fresh cgroup for one call (None without a plan), removed when the block ends.

    Raises:
        RuntimeError: The cgroup could not be made (an infrastructure fault, like any other
            failure to start the sandbox).
    """
    if plan is None:
        yield None
        return
    try:
        group = CallCgroup(plan, memory_bytes, max_tasks)
    except OSError as exc:
        raise RuntimeError(f"could not make the call's cgroup under {plan.memory_parent}: {exc}") from exc
    try:
        yield group
    finally:
        group.remove()
