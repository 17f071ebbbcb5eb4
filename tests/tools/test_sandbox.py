"""The Python sandbox against real programs: a real subprocess, real limits, no mocks.

Parts that only hold with full isolation (namespaces, per-run uid) skip with the reason when the
host cannot give it, so a skip here is a finding about the host, not a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
from leftovers import scan_leftover_processes

from agentrl.errors import ToolError, ToolErrorKind
from agentrl.tools import sandbox as sandbox_module
from agentrl.tools import sandbox_cgroup
from agentrl.tools.builtin.python import format_result, make_python_tool, python_tool
from agentrl.tools.sandbox import SandboxLimits, _interpreter_candidates, run_python, sandbox_isolation
from agentrl.tools.sandbox_cgroup import find_cgroup_plan

FAST = SandboxLimits(cpu_seconds=5, wall_seconds=2.0)


def run(code: str, limits: SandboxLimits = FAST):
    return asyncio.run(run_python(code, limits))


def isolation():
    return asyncio.run(sandbox_isolation())


def assert_nothing_left() -> None:
    assert scan_leftover_processes() == []


def test_normal_code_runs():
    result = run("import math\nprint(math.factorial(10))")
    assert (result.stdout, result.exit_code, result.killed_signal) == ("3628800\n", 0, None)
    assert result.ok and not result.timed_out and not result.output_truncated
    assert_nothing_left()


def test_exception_and_exit_code_are_results():
    result = run("import sys\nprint('before')\nsys.stdout.flush()\nraise ValueError('boom')")
    assert result.exit_code == 1 and result.stdout == "before\n"
    assert "ValueError: boom" in result.stderr
    assert run("import sys; sys.exit(7)").exit_code == 7


def test_infinite_loop_times_out_and_leaves_no_process():
    start = time.monotonic()
    result = run("while True: pass", SandboxLimits(cpu_seconds=30, wall_seconds=1.0))
    assert result.timed_out and result.killed_signal == signal.SIGKILL and result.exit_code is None
    assert time.monotonic() - start < 3.0
    assert_nothing_left()


def test_cpu_limit_stops_a_busy_program():
    result = run("while True: pass", SandboxLimits(cpu_seconds=1, wall_seconds=5.0))
    assert not result.timed_out
    assert result.killed_signal in (signal.SIGXCPU, signal.SIGKILL)  # soft limit, then hard limit


def test_fork_bomb_is_contained_and_reaped():
    # Children call setsid(), so killing the process group alone would miss them.
    bomb = "import os\nprint('start', flush=True)\nwhile True:\n    try:\n        os.fork() or os.setsid()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run(bomb, SandboxLimits(wall_seconds=1.5, max_processes=16))
    assert result.timed_out and result.stdout.startswith("start")
    assert time.monotonic() - start < 5.0
    if not (isolation().pid_namespace or isolation().per_run_uid):
        pytest.skip("no pid namespace and no per-run uid: setsid() children may escape here")
    assert_nothing_left()


def test_process_limit_applies_and_background_children_die_with_the_run():
    code = (
        "import os, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n    except OSError:\n"
        "        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    result = run(code, SandboxLimits(wall_seconds=5.0, max_processes=8))
    assert result.exit_code == 0 and not result.timed_out
    if isolation().per_run_uid:
        assert int(result.stdout) == 7  # 8 processes of the uid: the program itself and 7 children
    assert result.duration_s < 4.0  # the run ended with the program, not with its sleeping children
    assert_nothing_left()


def test_huge_output_is_capped_not_buffered():
    # 10**8 characters fit in the default 512 MiB; the host keeps 64 KiB and kills the writer.
    result = run("print('x' * 10**8)", SandboxLimits(wall_seconds=5.0, max_output_bytes=64 * 1024))
    assert result.output_truncated and not result.timed_out
    assert result.stdout == "x" * (64 * 1024) and result.killed_signal == signal.SIGKILL
    endless = run("while True:\n    print('y' * 1000)", SandboxLimits(wall_seconds=5.0, max_output_bytes=10_000))
    assert endless.output_truncated and len(endless.stdout) == 10_000
    # 10**9 characters do not even fit in the address-space limit: MemoryError inside, host untouched.
    giant = run("print('x' * 10**9)", SandboxLimits(wall_seconds=5.0))
    assert giant.exit_code == 1 and "MemoryError" in giant.stderr and giant.stdout == ""
    assert_nothing_left()


def test_huge_allocation_raises_memory_error_inside():
    result = run("x = bytearray(10**10)", SandboxLimits(wall_seconds=5.0, memory_bytes=256 * 2**20))
    assert result.exit_code == 1 and "MemoryError" in result.stderr


def test_host_secrets_are_not_visible(monkeypatch):
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("AGENTRL_FAKE_SECRET", secret)
    if not (isolation().pid_namespace or isolation().per_run_uid):
        pytest.skip("without a pid namespace or another uid, /proc/<host pid>/environ is readable")
    code = (
        "import os\nprint(dict(os.environ))\nfor pid in ['1', 'self'] + os.listdir('/proc'):\n    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n    except (OSError, ValueError) as e:\n"
        "        print(pid, type(e).__name__)\n"
    )
    result = run(code)
    assert result.exit_code == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "AGENTRL_FAKE_SECRET" not in result.stdout


def test_writes_outside_the_workdir_do_not_reach_the_host(tmp_path):
    iso = isolation()
    name = f"agentrl-escape-{uuid.uuid4().hex}"
    targets = [f"../../tmp/{name}", f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", f"/{name}",
               f"/etc/{name}", str(tmp_path / name)]
    code = f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n" \
           "    except OSError as e:\n        print('refused', path, type(e).__name__)\nopen('inside.txt', 'w').write('ok')\n"
    result = run(code)
    assert result.exit_code == 0, result.stderr
    host_paths = ["/tmp/" + name, "/var/tmp/" + name, "/dev/shm/" + name, "/" + name, "/etc/" + name, str(tmp_path / name)]
    leaked = [p for p in host_paths if os.path.exists(p)]
    for p in leaked:  # leave the host clean even when the assertion below fails
        os.remove(p)
    if not iso.private_mounts:
        pytest.skip(f"no private mount namespace: world-writable dirs are shared (leaked: {leaked})")
    assert leaked == []


def test_no_network_inside():
    if not isolation().network_namespace:
        pytest.skip("no network namespace here; not sending real traffic to check")
    code = (
        "import socket\nfor addr in [('169.254.169.254', 80), ('1.1.1.1', 53)]:\n    try:\n"
        "        socket.create_connection(addr, timeout=1).close()\n        print('connected', addr)\n"
        "    except OSError as e:\n        print('blocked', addr, e.errno)\n"
    )
    result = run(code)
    assert result.stdout.count("blocked") == 2 and "connected" not in result.stdout
    assert result.duration_s < 2.0  # refused at once (no route), not after a connect timeout


def test_invalid_utf8_output_is_replaced():
    result = run(r"import sys; sys.stdout.buffer.write(b'ok \xff\xfe end\n'); sys.stderr.buffer.write(b'\xc3(')")
    assert result.stdout == "ok \ufffd\ufffd end\n"
    assert result.stderr == "\ufffd("


def test_python_tool_formats_results_and_raises_typed_errors():
    assert python_tool.name == "python" and python_tool.parameters["required"] == ["code"]
    assert asyncio.run(python_tool.fn("print(2 + 2)")) == "4\n"
    failed = asyncio.run(python_tool.fn("print('partial')\n1/0"))
    assert failed.startswith("partial\n[exit code 1]") and "ZeroDivisionError" in failed
    with pytest.raises(ToolError) as info:
        asyncio.run(python_tool.fn("while True:\n    print('z' * 4096)"))
    assert info.value.kind is ToolErrorKind.OUTPUT_TOO_LARGE and "zzz" in info.value.message


# -- which mechanisms hold, and the fallbacks ------------------------------------------------------
def _unshare_works() -> bool:
    """An independent check that this host gives network, mount and pid namespaces."""
    unshare = shutil.which("unshare")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    cmd = [unshare, *user, "--net", "--mount", "--pid", "--fork", "--mount-proc", "true"] if unshare else None
    return cmd is not None and subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


def test_uses_the_strongest_isolation_this_host_offers(capsys):
    iso = isolation()
    asserted = []
    if os.geteuid() == 0:
        assert iso.per_run_uid
        asserted.append("per-run uid")
    if _unshare_works():
        assert iso.network_namespace and iso.private_mounts and iso.pid_namespace
        asserted.append("namespaces and the minimal root")
    plan, note = find_cgroup_plan()
    if plan is not None:
        assert iso.cgroup == plan, note
        asserted.append(f"per-call cgroup ({note})")
    with capsys.disabled():
        print(f"\nsandbox on this host: {asserted or 'nothing beyond rlimits'}; cgroups: {note}")
    assert {name for name, _, _ in iso.mechanisms()} >= {"network namespace", "per-run uid", "pid namespace"}


def test_mechanisms_are_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(sandbox_module, "_isolation", {})
    with caplog.at_level(logging.INFO, logger="agentrl.tools.sandbox"):
        iso = isolation()
        isolation()
    lines = [r.getMessage() for r in caplog.records if "python sandbox mechanisms" in r.getMessage()]
    assert len(lines) == 1
    for name, active, _ in iso.mechanisms():
        assert f"{name}: {'yes' if active else 'NO'}" in lines[0]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "PARTIAL" in r.getMessage()]
    assert bool(warned) == (not all(active for _, active, _ in iso.mechanisms()))


def _weak(iso):
    """This host's isolation without any namespace (per-run uid and cgroup kept), as a host without them."""
    weak = dataclasses.replace(iso, network_namespace=False, pid_namespace=False, private_mounts=False, prefix=())
    for interpreter in _interpreter_candidates():  # the uid must be able to run it without the minimal root
        candidate = dataclasses.replace(weak, interpreter=interpreter)
        with contextlib.suppress(RuntimeError):
            if asyncio.run(sandbox_module._run(candidate, "print(1)", FAST)).stdout == "1\n":
                return candidate
    pytest.fail(f"no interpreter runs without namespaces: {_interpreter_candidates()}")


def test_without_a_mount_namespace_disk_is_polled_and_temp_files_removed():
    if not isolation().per_run_uid:
        pytest.skip("not root: without a per-run uid the run's files in shared temp dirs cannot be told apart")
    weak = _weak(isolation())
    name = f"agentrl-fill-{uuid.uuid4().hex}"
    code = (f"n = 0\nwhile True:\n    with open('/tmp/{name}-%d' % n if n % 2 else 'f%d' % n, 'wb') as f:\n"
            "        f.write(b'y' * 2**20)\n    n += 1\n")
    limits = SandboxLimits(wall_seconds=10.0, disk_bytes=16 * 2**20)
    result = asyncio.run(sandbox_module._run(weak, code, limits))
    assert result.disk_exceeded and result.killed_signal == signal.SIGKILL and not result.timed_out
    assert result.duration_s < 5.0  # killed within a few polls, not at the wall limit
    assert [f for f in os.listdir("/tmp") if f.startswith(name)] == []  # what it left in /tmp is gone
    assert_nothing_left()
    text = format_result(result, limits)
    assert "[killed by SIGKILL (the program wrote more than 16 MiB of files)]" in text


def test_concurrent_runs_do_not_see_each_other():
    if not isolation().private_mounts:
        pytest.skip("no mount namespace: concurrent runs share /tmp here")
    writer = "open('/tmp/mine', 'w').write('a')\nopen('mine', 'w').write('a')\nimport time\ntime.sleep(1.0)\nprint('wrote')"
    reader = "import os, time\ntime.sleep(0.5)\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('.')))"

    async def both():
        roomy = dataclasses.replace(FAST, wall_seconds=10.0)  # the writer sleeps 1 s: FAST's 2 s is tight on a loaded machine
        return await asyncio.gather(run_python(writer, roomy), run_python(reader, roomy))

    wrote, read = asyncio.run(both())
    assert wrote.stdout == "wrote\n" and read.stdout == "['work'] []\n", (wrote, read)


# 3 x 100 MiB: each process fits a 128 MiB address-space limit, the three together do not
THREE_HOGS = ("import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
              "        x = b'x' * (100 * 2**20)\n        time.sleep(0.5)\n        os._exit(0)\n    kids.append(pid)\n"
              "print(sorted(os.waitpid(p, 0)[1] for p in kids))\n")


def test_memory_limit_is_per_call_and_named_to_the_model():
    if isolation().cgroup is None:
        pytest.skip(f"no per-call cgroup here ({isolation().cgroup_note}): memory is bounded per process only")
    limits = SandboxLimits(wall_seconds=5.0, memory_bytes=128 * 2**20)
    result = asyncio.run(run_python(THREE_HOGS, limits))
    assert result.memory_exceeded and result.exit_code == 0, result
    assert result.peak_memory_bytes is None or result.peak_memory_bytes <= limits.memory_bytes
    assert "9" in result.stdout  # at least one child SIGKILLed
    text = asyncio.run(make_python_tool(limits).fn(THREE_HOGS))
    assert text.endswith("[a process was killed (this call's memory limit of 128 MiB was reached)]\n"), text
    assert_nothing_left()


def test_delegated_cgroup_v2_bounds_a_call(monkeypatch, tmp_path):
    """The cgroup v2 path, set up as docs/reliability.md tells an operator to (root only)."""
    hierarchies = sandbox_cgroup._hierarchies() if os.path.exists("/proc/self/cgroup") else {}
    own = hierarchies.get("")
    if os.geteuid() != 0 or own is None or "memory" not in open(os.path.join(own, "cgroup.controllers")).read():
        pytest.skip("no cgroup v2 memory controller for this process here (root and a v2 host are needed)")
    delegated = os.path.join(os.path.dirname(own), f"agentrl-test-{os.getpid()}")  # a sibling: holds no process
    os.mkdir(delegated)
    try:
        monkeypatch.setenv(sandbox_cgroup.ENV_VAR, delegated)
        monkeypatch.setattr(sandbox_module, "_isolation", {})
        iso = isolation()
        pids = "pids" in open(os.path.join(delegated, "cgroup.controllers")).read().split()
        assert iso.cgroup == sandbox_cgroup.CgroupPlan(2, delegated, delegated if pids else None)
        result = run(THREE_HOGS, SandboxLimits(wall_seconds=5.0, memory_bytes=128 * 2**20))
        assert result.memory_exceeded and result.peak_memory_bytes <= 128 * 2**20, result
        assert [n for n in os.listdir(delegated) if n.startswith("agentrl-")] == []
    finally:
        monkeypatch.setattr(sandbox_module, "_isolation", {})
        os.rmdir(delegated)


def test_an_unusable_delegated_cgroup_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(sandbox_cgroup.ENV_VAR, str(tmp_path))
    with pytest.raises(RuntimeError, match="is not a usable delegated cgroup v2 directory"):
        find_cgroup_plan()
