"""Engine servers that agentrl starts, watches and stops, or reaches at a URL the user gives.

The SGLang and vLLM backends can run in-process or talk HTTP to a server. `ServerSpec` says which
(and how to launch one); `ManagedServer` owns the server's life: a free port on 127.0.0.1, a
subprocess in its own process session (so a Ctrl-C in the driver's terminal reaches the driver
only, and the driver decides the shutdown order), output captured to `<log_dir>/<name>.log`,
readiness by polling the health URL, restart after a crash (the backend re-syncs its current
weights in `on_restart`), and a shutdown that takes the whole process group with it, engines'
scheduler and worker subprocesses included. The session's first process is `server_guard`, which
runs the server and stops the group when agentrl's process dies without stopping it (SIGKILL,
as Ray does to a hung worker). Every wait is bounded: a server that never becomes
healthy, or accepts connections and never answers, ends in a typed error, not a hang.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from agentrl.errors import ConfigError, EngineError, ServerCrashedError, ServerStartError
from agentrl.rollout.backends import server_guard
from agentrl.rollout.backends.server_guard import group_alive

logger = logging.getLogger(__name__)

_POLL_S = 0.25  # between health probes while a server starts
_STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL
_LOG_TAIL_CHARS = 4000


class FrozenEnv(Mapping[str, str]):
    """A read-only str -> str mapping that hashes and pickles (a `ServerSpec` travels to Ray workers)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] = types.MappingProxyType({})):
        self._items = {str(k): str(v) for k, v in items.items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenEnv({self._items!r})"


@dataclass(frozen=True)
class ServerSpec:
    """Where a backend's engine runs. Neither `url` nor `launch`: in the backend's own process.

    Attributes:
        url: Connect to a server that is already running (agentrl never starts or stops it).
        launch: Start a server as a subprocess on a free port of 127.0.0.1, and stop it on close.
        args: Extra command-line arguments for the launched server.
        env: Extra environment variables for the launched server (e.g. CUDA_VISIBLE_DEVICES).
        startup_timeout_s: How long a server may take to answer its health check.
        max_restarts: Crashes of a launched server that are restarted over a run; one more is an error.
        log_dir: Where the launched server's output goes (`<log_dir>/<name>.log`); None: a temp dir.
    """

    url: str | None = None
    launch: bool = False
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=FrozenEnv)
    startup_timeout_s: float = 600.0
    max_restarts: int = 3
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and self.launch:
            raise ConfigError("a server spec has both url and launch: give url to connect to a running "
                              "server, or launch to have agentrl start one, not both")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"server url must start with http:// or https://, got {self.url!r}")
        if not self.startup_timeout_s > 0:
            raise ConfigError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts}")
        # Frozen means frozen: copies, so a caller mutating its dict or list later changes nothing here.
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))
        object.__setattr__(self, "env", FrozenEnv(self.env))

    @property
    def mode(self) -> str:
        """`url`, `launch` or `in_process`."""
        return "url" if self.url is not None else "launch" if self.launch else "in_process"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers bind with SO_REUSEADDR, so a port in TIME_WAIT after a crash is free for them too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class ManagedServer:
    """One engine server: launched and watched by agentrl (`spec.launch`), or reached at `spec.url`.

    Args:
        name: Names the log file (`<log_dir>/<name>.log`) and the server in messages.
        command: Builds the server's command line for a port, e.g.
            `lambda port: [sys.executable, "-m", "sglang.launch_server", "--port", str(port), ...]`;
            `spec.args` are appended.
        spec: Where the server is; must have `url` or `launch`.
        health_path: GET path that answers 200 once the server can take requests.
        on_restart: Called after a crashed server came back, so the backend can load its current
            weights into it again (a restarted server starts from the weights on disk).
        health_timeout_s: Bound on one health request (a server that accepts connections and never
            answers costs at most this per probe).
        stop_grace_s: How long `stop()` waits after SIGTERM before it SIGKILLs the group.

    Example:
        >>> with ManagedServer("sglang", build_cmd, ServerSpec(launch=True)) as server:  # doctest: +SKIP
        ...     httpx.post(server.url + "/generate", json=...)
    """

    def __init__(self, name: str, command: Callable[[int], list[str]], spec: ServerSpec, *,
                 health_path: str = "/health", on_restart: Callable[[], None] | None = None,
                 health_timeout_s: float = 10.0, stop_grace_s: float = _STOP_GRACE_S):
        if spec.mode == "in_process":
            raise ConfigError(f"ManagedServer {name!r} needs a spec with url (a running server) or launch=True "
                              "(agentrl starts one); a spec with neither means the engine runs in-process")
        self.name = name
        self.spec = spec
        self.restarts = 0
        self._command = command
        self._health_path = health_path if health_path.startswith("/") else "/" + health_path
        self._on_restart = on_restart
        self._health_timeout_s = health_timeout_s
        self._stop_grace_s = stop_grace_s
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._port: int | None = None
        self._argv: list[str] = []
        self._log_path: str | None = None
        self._tmp_log_dir: str | None = None
        self._started = False
        self._gave_up: str | None = None  # why the server is given up for good (max_restarts passed)

    # -- public -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server (no trailing slash). A launched server's port can change on restart."""
        if self.spec.url is not None:
            return self.spec.url.rstrip("/")
        if self._port is None:
            raise EngineError(f"server {self.name!r} has not been started yet: call start() first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def log_path(self) -> str | None:
        """The launched server's log file (None before start, or when connecting to a URL)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process group id of a running launched server (the pid of `server_guard`, which runs the
        server command as its child), None when not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> ManagedServer:
        """Launch the server (or, for a URL, wait for it) and return once it answers its health check.

        Raises:
            ServerStartError: It exited, or did not answer within `spec.startup_timeout_s`; the
                message holds the command and the tail of its log.
        """
        with self._lock:
            if self._started:
                return self
            if self.spec.mode == "url":
                self._wait_for_url()
            else:
                self._launch(port=free_port())
            self._started = True
            return self

    def ensure(self, *, probe: bool = False) -> bool:
        """Make sure the server is up; returns True when it had to be restarted.

        A launched server whose process exited is restarted on a free port (the same one when it
        is still free), then `on_restart` runs. With `probe`, a health request is also sent: a
        launched server that does not answer within `health_timeout_s` counts as crashed (it is
        killed and restarted); a URL server that does not answer raises (agentrl cannot restart
        what it did not start). Backends call `ensure()` before work and `ensure(probe=True)`
        after a request failed or timed out.

        Raises:
            ServerCrashedError: More than `spec.max_restarts` crashes (then on every later call
                too), or a URL server is down.
            ServerStartError: The restarted server did not come up (the next call tries again,
                counted as one more restart).
        """
        with self._lock:
            if not self._started:
                raise EngineError(f"server {self.name!r} has not been started yet: call start() first")
            if self.spec.mode == "url":
                if probe and not self._healthy(trust_env=True):
                    raise ServerCrashedError(
                        f"engine server {self.name!r} at {self.url} does not answer {self._health_path} "
                        f"within {self._health_timeout_s:g} s; agentrl does not restart a server it did not "
                        "start: restart it (or give rollout.server.launch: true to have agentrl manage it)")
                return False
            if self._gave_up is not None:
                raise ServerCrashedError(self._gave_up)
            if self._proc is None:  # the last restart did not come up
                return self._restart("did not come up after its last restart")
            code = self._proc.poll()
            if code is None and not (probe and not self._healthy(trust_env=False)):
                return False
            why = (f"exited with code {code}" if code is not None else
                   f"stopped answering {self._health_path} within {self._health_timeout_s:g} s")
            return self._restart(why)

    def stop(self) -> None:
        """Stop a launched server and every process in its group (SIGTERM, wait, SIGKILL). Idempotent.

        For a URL server this only forgets it; the server keeps running.
        """
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()  # runs _terminate_group once; also what runs at interpreter exit
                self._finalizer = None
            self._proc = None
            self._started = False

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- launching ----------------------------------------------------------------------------

    def _launch(self, port: int, why: str = "") -> None:
        self._port = port
        self._argv = [*self._command(port), *self.spec.args]
        log_dir = self.spec.log_dir or self._temp_log_dir()
        os.makedirs(log_dir, exist_ok=True)
        self._log_path = os.path.join(log_dir, f"{self.name}.log")
        with open(self._log_path, "a") as log:
            # Appended, so the output of a crashed server is still there after its restart.
            reason = f" (restart {self.restarts}: the server {why})" if why else ""
            log.write(f"\n=== agentrl: starting {self.name}{reason} at {time.ctime()}: {shlex.join(self._argv)}\n")
            log.flush()
            try:
                # The guard leads the new session and stops the group if this process dies without stop().
                # -I: the guard needs the standard library only; nothing on sys.path may shadow it.
                guarded = [sys.executable, "-I", server_guard.__file__, str(os.getpid()),
                           f"{self._stop_grace_s:g}", "--", *self._argv]
                proc = subprocess.Popen(guarded, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.spec.env}, start_new_session=True)
            except OSError as exc:
                raise ServerStartError(f"could not start engine server {self.name!r}: {exc}\n"
                                       f"command: {shlex.join(self._argv)}") from exc
        self._proc = proc
        # At interpreter exit (or when this object is collected) the group is stopped too, so a
        # driver that dies of an exception leaves no server behind (after a SIGKILL, the guard does it).
        self._finalizer = weakref.finalize(self, _terminate_group, proc, self._stop_grace_s)
        try:
            self._wait_until_healthy(proc)
        except BaseException:
            self._finalizer()
            self._finalizer = None
            self._proc = None
            raise

    def _temp_log_dir(self) -> str:
        if self._tmp_log_dir is None:
            self._tmp_log_dir = tempfile.mkdtemp(prefix=f"agentrl-{self.name}-")
        return self._tmp_log_dir

    def _wait_until_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerStartError(self._start_failure(f"exited with code {code} before it was ready"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(self._start_failure(
                    f"did not answer {self._health_path} within startup_timeout_s={self.spec.startup_timeout_s:g} s "
                    "(raise rollout.server.startup_timeout_s if it is only slow to load)"))
            if self._healthy(trust_env=False, timeout_s=min(self._health_timeout_s, max(remaining, 0.05))):
                return
            time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0)))

    def _wait_for_url(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"engine server {self.name!r} at {self.url} did not answer {self._health_path} within "
                    f"startup_timeout_s={self.spec.startup_timeout_s:g} s: check that it runs and that the URL "
                    "is right (or give rollout.server.launch: true to have agentrl start one)")
            # trust_env: a user's URL may need their proxy settings; our own 127.0.0.1 servers never do.
            if self._healthy(trust_env=True, timeout_s=min(self._health_timeout_s, max(remaining, 0.05))):
                return
            time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0)))

    def _healthy(self, *, trust_env: bool, timeout_s: float | None = None) -> bool:
        try:
            with httpx.Client(trust_env=trust_env, timeout=timeout_s or self._health_timeout_s) as client:
                return client.get(self.url + self._health_path).status_code == 200
        except httpx.HTTPError:
            return False

    def _restart(self, why: str) -> bool:
        tail = log_tail(self._log_path)
        if self._finalizer is not None:
            self._finalizer()  # a crashed leader's children (scheduler, workers) must not outlive it
            self._finalizer = None
        self._proc = None
        if self.restarts >= self.spec.max_restarts:
            self._gave_up = (f"engine server {self.name!r} {why}, after {self.restarts} restart(s) already "
                             f"(max_restarts={self.spec.max_restarts}); see {self._log_path}. Last output:\n{tail}")
            raise ServerCrashedError(self._gave_up)
        self.restarts += 1
        logger.warning("engine server %r %s; restarting it (%d of at most %d)", self.name, why,
                       self.restarts, self.spec.max_restarts)
        port = self._port if self._port is not None and _port_is_free(self._port) else free_port()
        self._launch(port, why)
        if self._on_restart is not None:
            self._on_restart()
        return True

    def _start_failure(self, what: str) -> str:
        return (f"engine server {self.name!r} {what}.\ncommand: {shlex.join(self._argv)}\nlog: {self._log_path}\n"
                f"last output:\n{log_tail(self._log_path)}")


def log_tail(path: str | None, chars: int = _LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file ('' when there is none), for error messages."""
    if path is None or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode("utf-8", errors="replace")


def _terminate_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group led by `proc`, wait up to `grace_s`, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session made the server its group's (and session's) leader
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state); nothing more a signal can do
            logger.warning("engine server process %d did not die after SIGKILL", proc.pid)
        deadline = time.monotonic() + 5.0
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.poll()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
