"""The first process of a launched engine server's session: it runs the server and outlives nobody.

`ManagedServer` starts `python -I server_guard.py PARENT GRACE -- COMMAND...` in a new session (by
file path, with the standard library only: it needs no agentrl on the child's sys.path, and `-I`
keeps this folder off it, where a module could shadow a standard one). The guard starts COMMAND in
its process group, waits for it, and exits with its exit status. Meanwhile it watches its parent:
when the parent is gone (a driver or Ray worker killed with SIGKILL runs no atexit handler, and the
server, in its own session, would live on holding the GPU), it stops the whole group: SIGTERM,
GRACE seconds, SIGKILL. A stop by the parent needs no help from the guard: `ManagedServer.stop`
signals the whole group, the guard with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_WATCH_S = 0.5  # how often the parent is checked (the longest an orphaned server runs before SIGTERM)


def _say(text: str) -> None:
    print(f"agentrl server guard: {text}", flush=True)


def _stop_group(grace_s: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the guard itself stays to finish the job
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(-1, os.WNOHANG)  # reap the server, so it does not count as alive
        except ChildProcessError:
            pass
        if not _others_alive():
            return
        time.sleep(0.05)
    _say(f"the group did not stop within {grace_s:g} s of SIGTERM; sending SIGKILL")
    os.killpg(0, signal.SIGKILL)


def _others_alive() -> bool:
    """Whether a process of this group other than the guard runs (zombies do not count)."""
    return bool(group_members(os.getpgrp()) - {os.getpid()})


def group_members(pgid: int) -> set[int]:
    """Pids of the processes of group `pgid` that still run (zombies left out), from /proc."""
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.add(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies, dead already, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds for zombies too: orphans that an init which never reaps keeps around.
    return not os.path.isdir("/proc") or bool(group_members(pgid))


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m agentrl.rollout.backends.server_guard PARENT_PID GRACE_S -- COMMAND...",
              file=sys.stderr)
        return 2
    parent, grace_s, command = int(argv[0]), float(argv[1]), argv[3:]
    try:
        server = subprocess.Popen(command)
    except OSError as exc:
        _say(f"cannot start {command[0]!r}: {exc}")
        return 127
    while True:
        try:
            code = server.wait(timeout=_WATCH_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                _say(f"agentrl process {parent} is gone; stopping the server")
                _stop_group(grace_s)
                return 1
            continue
        if code < 0:
            _say(f"the server was killed by signal {-code} ({signal.Signals(-code).name})")
            return 128 - code
        return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
