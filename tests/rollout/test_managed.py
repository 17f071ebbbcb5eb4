"""Managed engine servers (agentrl/rollout/backends/managed.py) against a real stand-in server process.

tests/rollout/standin_server.py is a real HTTP server on 127.0.0.1, started as a subprocess, that
becomes healthy after a delay, crashes at start or later, hangs, freezes, exits, ignores SIGTERM or
spawns a child of its own (as SGLang's scheduler processes are). Orphans are counted with psutil.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from agentrl.errors import ConfigError, EngineError, ServerCrashedError, ServerStartError
from agentrl.rollout.backends.managed import ManagedServer, ServerSpec, free_port, group_alive

STANDIN = str(Path(__file__).with_name("standin_server.py"))
ROOT = Path(__file__).resolve().parents[2]


def standin(port: int) -> list[str]:
    return [sys.executable, "-u", STANDIN, "--port", str(port)]


def spec(tmp_path: Path, *args: str, **kw) -> ServerSpec:
    kw.setdefault("startup_timeout_s", 60.0)  # generous: the CI machine may be loaded
    return ServerSpec(launch=True, args=args, log_dir=str(tmp_path / "servers"), **kw)


def alive(pid: int) -> bool:
    assert isinstance(pid, int)  # psutil.Process(None) would be this test process
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def info(server: ManagedServer) -> dict:
    return httpx.get(server.url + "/info", timeout=10, trust_env=False).json()


def wait_exit(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"process {pid} still alive after {timeout_s} s"


# -- the spec --------------------------------------------------------------------------------

def test_spec_refuses_url_and_launch_together_and_bad_bounds():
    with pytest.raises(ConfigError, match="both url and launch"):
        ServerSpec(url="http://127.0.0.1:1", launch=True)
    with pytest.raises(ConfigError, match="http://"):
        ServerSpec(url="127.0.0.1:30000")
    with pytest.raises(ConfigError, match="startup_timeout_s"):
        ServerSpec(launch=True, startup_timeout_s=0)
    with pytest.raises(ConfigError, match="max_restarts"):
        ServerSpec(launch=True, max_restarts=-1)
    assert ServerSpec().mode == "in_process"
    assert ServerSpec(launch=True).mode == "launch" and ServerSpec(url="http://h:1").mode == "url"


def test_spec_is_frozen_against_later_changes_of_its_inputs_and_travels_by_pickle():
    env = {"A": "1"}
    s = ServerSpec(launch=True, env=env, args=["--x"], log_dir="/tmp/x")
    env["A"] = "2"
    assert s.env["A"] == "1" and s.args == ("--x",) and dict(s.env) == {"A": "1"}
    with pytest.raises(TypeError):
        s.env["B"] = "3"  # type: ignore[index]
    back = pickle.loads(pickle.dumps(s))  # Ray ships it to rollout workers
    assert back == s and hash(back) == hash(s) and dict(back.env) == {"A": "1"}


def test_managed_server_needs_url_or_launch():
    with pytest.raises(ConfigError, match="in-process"):
        ManagedServer("x", standin, ServerSpec())


def test_url_before_start_is_an_error(tmp_path):
    with pytest.raises(EngineError, match="start"):
        ManagedServer("x", standin, spec(tmp_path)).url


# -- launching -------------------------------------------------------------------------------

def test_start_waits_for_a_slow_server_then_stop_leaves_nothing(tmp_path):
    server = ManagedServer("slow", standin, spec(tmp_path, "--delay", "1.0", env={"STANDIN_MARKER": "m1"}))
    t0 = time.monotonic()
    with server:
        assert time.monotonic() - t0 >= 1.0  # it was not healthy before the delay ran out
        got = info(server)
        assert got["marker"] == "m1"  # spec.env reaches the server
        group = server.pid
        assert os.getpgid(got["pid"]) == group != os.getpgrp()  # a session of its own
        assert server.url.startswith("http://127.0.0.1:")
    assert not alive(got["pid"]) and not alive(group)  # stop() returned only once the processes were gone
    log = (tmp_path / "servers" / "slow.log").read_text()
    assert "ready" in log and "got SIGTERM, exiting" in log  # SIGTERM first, and the server heard it
    assert server.pid is None
    server.stop()  # idempotent


def test_crash_at_start_is_a_start_error_with_the_log_tail_and_command(tmp_path):
    server = ManagedServer("crashy", standin, spec(tmp_path, "--crash-at-start"))
    with pytest.raises(ServerStartError) as err:
        server.start()
    text = str(err.value)
    assert "exited with code 3" in text and "boom: crashing at start" in text
    assert "standin_server.py" in text and "--crash-at-start" in text  # the command
    assert str(tmp_path / "servers" / "crashy.log") in text


def test_a_server_that_hangs_times_out_and_is_killed(tmp_path):
    # 8 s: the stand-in (two interpreters start) must be up and say so in its log before the timeout
    server = ManagedServer("hung", standin, spec(tmp_path, "--hang", startup_timeout_s=8.0), health_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="did not answer /health within startup_timeout_s=8") as err:
        server.start()
    elapsed = time.monotonic() - t0
    assert 8.0 <= elapsed < 8.0 + 1.0 + 11.0  # the timeout, one probe and the SIGTERM grace at most
    assert "listening, never answering" in str(err.value)
    pid = int(str(err.value).split("standin[")[1].split("]")[0])
    assert not alive(pid)


def test_a_crashed_server_is_restarted_and_on_restart_runs(tmp_path):
    calls = []
    server = ManagedServer("flaky", standin, spec(tmp_path, max_restarts=2), on_restart=lambda: calls.append(1))
    with server:
        assert server.ensure() is False and calls == []  # healthy: nothing to do
        first = _crash(server)
        assert server.ensure() is True and calls == [1] and server.restarts == 1
        assert server.pid != first and os.getpgid(info(server)["pid"]) == server.pid  # a new process answers
        _crash(server)
        assert server.ensure() is True and calls == [1, 1]
        _crash(server)
        with pytest.raises(ServerCrashedError, match="after 2 restart") as err:
            server.ensure()
        assert "crashing on request" in str(err.value)
        with pytest.raises(ServerCrashedError, match="after 2 restart"):  # given up for good, not half-alive
            server.ensure()
    assert calls == [1, 1]


def _crash(server: ManagedServer) -> int:
    """Make the server exit with code 7; returns its pid once the process is gone."""
    pid = server.pid
    assert pid is not None
    with pytest.raises(httpx.HTTPError):  # the server dies before it answers
        httpx.get(server.url + "/crash", timeout=10, trust_env=False)
    wait_exit(pid)
    return pid


def test_a_clean_exit_is_restarted_too(tmp_path):
    calls = []
    with ManagedServer("quits", standin, spec(tmp_path), on_restart=lambda: calls.append(1)) as server:
        pid = server.pid
        httpx.get(server.url + "/exit", timeout=10, trust_env=False)
        wait_exit(pid)
        assert server.ensure() is True and calls == [1]
    log = (tmp_path / "servers" / "quits.log").read_text()
    assert "exiting cleanly on request" in log and "(restart 1: the server exited with code 0)" in log


def test_a_frozen_server_is_found_by_a_probe_and_replaced(tmp_path):
    with ManagedServer("frozen", standin, spec(tmp_path), health_timeout_s=1.0, stop_grace_s=2.0) as server:
        pid = server.pid
        httpx.get(server.url + "/freeze", timeout=10, trust_env=False)
        assert server.ensure() is False  # alive; without a probe nothing is sent
        t0 = time.monotonic()
        assert server.ensure(probe=True) is True
        assert time.monotonic() - t0 < 30
        assert not alive(pid) and server.pid != pid and server.restarts == 1


def test_a_restart_that_cannot_start_raises_start_error(tmp_path):
    marker = tmp_path / "crash-next-time"
    with ManagedServer("once", standin, spec(tmp_path, "--crash-at-start-if", str(marker))) as server:
        marker.write_text("")
        _crash(server)
        with pytest.raises(ServerStartError, match="boom: crashing at start"):
            server.ensure()
        marker.unlink()  # whatever broke the start is fixed: the next call restarts it, counted
        assert server.ensure() is True and server.restarts == 2 and info(server)["pid"]


# -- no orphans ------------------------------------------------------------------------------

def test_stop_kills_the_servers_own_children_and_a_server_ignoring_sigterm(tmp_path):
    server = ManagedServer("family", standin, spec(tmp_path, "--spawn-child", "--ignore-term"), stop_grace_s=1.0)
    server.start()
    got = info(server)
    pid, child, group = got["pid"], got["child_pid"], server.pid
    assert alive(pid) and alive(child) and os.getpgid(child) == group
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 10
    assert not alive(pid) and not alive(child) and not group_alive(group)
    assert "got SIGTERM, ignoring it" in (tmp_path / "servers" / "family.log").read_text()


def test_a_crashed_servers_children_are_killed_before_the_restart(tmp_path):
    with ManagedServer("orphans", standin, spec(tmp_path, "--spawn-child"), stop_grace_s=1.0) as server:
        first = info(server)
        _crash(server)
        assert alive(first["child_pid"])  # the crash itself left the child running...
        assert server.ensure() is True
        assert not alive(first["child_pid"])  # ...and the restart took it down first
        second = info(server)
    assert not alive(second["pid"]) and not alive(second["child_pid"])


def _run_driver(tmp_path, name: str, ending: str) -> subprocess.CompletedProcess:
    """A driver process that starts server `name` (which spawns a child), prints its /info, then runs `ending`."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys, httpx
        sys.path.insert(0, {str(ROOT)!r})
        from agentrl.rollout.backends.managed import ManagedServer, ServerSpec
        cmd = lambda port: [sys.executable, "-u", {STANDIN!r}, "--port", str(port), "--spawn-child"]
        server = ManagedServer({name!r}, cmd, ServerSpec(launch=True, log_dir={str(tmp_path)!r}), stop_grace_s=1.0)
        server.start()
        print(json.dumps(httpx.get(server.url + "/info", trust_env=False).json()), flush=True)
    """) + ending + "\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_interpreter_exit_stops_a_server_nobody_stopped(tmp_path):
    # A driver that ends (here: by an exception) without calling stop() leaves no server behind.
    out = _run_driver(tmp_path, "leak", 'raise SystemExit("driver failed")')
    assert out.returncode == 1 and "driver failed" in out.stderr, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not alive(got["pid"]) and not alive(got["child_pid"])


def test_a_killed_driver_leaves_no_server_behind(tmp_path):
    # SIGKILL runs no atexit handler (Ray kills a hung worker so): the guard leading the server's
    # session sees its parent gone and stops the group, the server's own child included.
    out = _run_driver(tmp_path, "killed", "os.kill(os.getpid(), signal.SIGKILL)")
    assert out.returncode == -signal.SIGKILL, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    wait_exit(got["pid"], 10.0)  # the guard checks its parent every 0.5 s, then SIGTERM, 1 s, SIGKILL
    wait_exit(got["child_pid"], 10.0)
    assert "is gone; stopping the server" in (tmp_path / "killed.log").read_text()


def test_a_command_that_cannot_run_is_a_start_error(tmp_path):
    server = ManagedServer("missing", lambda port: ["/nonexistent/engine-server", str(port)], spec(tmp_path))
    with pytest.raises(ServerStartError, match="exited with code 127") as err:
        server.start()
    assert "/nonexistent/engine-server" in str(err.value) and "No such file" in str(err.value)


# -- a server at a URL -----------------------------------------------------------------------

def test_url_mode_only_health_checks_and_never_stops_the_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(standin(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = ManagedServer("remote", standin, ServerSpec(url=f"http://127.0.0.1:{port}/", startup_timeout_s=60),
                               health_timeout_s=1.0)
        with server:
            assert server.url == f"http://127.0.0.1:{port}" and server.pid is None and server.log_path is None
            assert server.ensure(probe=True) is False
        assert proc.poll() is None  # stop() left it running
        server.start()
        proc.kill()
        proc.wait()
        assert server.ensure() is False  # no probe: nothing is sent, nothing known
        with pytest.raises(ServerCrashedError, match="does not restart a server it did not start"):
            server.ensure(probe=True)
    finally:
        proc.kill()
        proc.wait()


def test_url_mode_with_nothing_listening_times_out(tmp_path):
    server = ManagedServer("nobody", standin, ServerSpec(url=f"http://127.0.0.1:{free_port()}", startup_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="check that it runs"):
        server.start()
    assert time.monotonic() - t0 < 10


def test_url_mode_with_a_hung_server_ends_in_a_typed_error(tmp_path):
    port = free_port()
    proc = subprocess.Popen([*standin(port), "--hang"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = ManagedServer("wedged", standin, ServerSpec(url=f"http://127.0.0.1:{port}", startup_timeout_s=2.0),
                               health_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(ServerStartError, match="did not answer /health within startup_timeout_s=2"):
            server.start()
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def test_without_a_log_dir_the_log_goes_to_a_temp_dir():
    with ManagedServer("tmplog", standin, ServerSpec(launch=True, startup_timeout_s=60)) as server:
        path = Path(server.log_path)
        assert path.name == "tmplog.log" and path.parent.name.startswith("agentrl-tmplog-")
    assert "ready" in path.read_text()
