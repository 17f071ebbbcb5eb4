"""The Python sandbox against real programs: a real subprocess, real limits, no mocks.

Parts that only hold with full isolation (namespaces, per-run uid) skip with the reason when the
host cannot give it, so a skip here is a finding about the host, not a pass.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest
from leftovers import scan_leftover_processes

from agentrl.errors import ToolError, ToolErrorKind
from agentrl.tools.builtin.python import python_tool
from agentrl.tools.sandbox import SandboxLimits, run_python, sandbox_isolation

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
