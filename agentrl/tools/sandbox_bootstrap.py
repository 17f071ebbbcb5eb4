"""The bootstrap that starts every sandboxed run, and the host's end of its protocol.

`agentrl.tools.sandbox` starts `python -I -S -c <this file's source> CONFIG_JSON`, as root of
the new namespaces when they work. Run that way, `main` (at the bottom) mounts the private tmpfs
and working directory, becomes the child subreaper (and, in a pid namespace, init), forks the
model's interpreter with rlimits under the per-run uid, waits for it, writes one status line
(`exit N`, `signal N` or `setup-failed WHY`) to the status fd, and sweeps what is left of the uid.

The file is sent as source text rather than imported because the sandbox interpreter runs with
`-I -S`: standard library only, no agentrl. Everything here must therefore need nothing but the
standard library, and importing it must do nothing (the host imports this module too, for
`bootstrap_argv` and `read_status`, the other ends of the config and of the report).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import sys

# prctl options and mount flags from <linux/prctl.h> and <sys/mount.h>
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 32, 4096


@functools.cache
def _source() -> str:
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def bootstrap_argv(prefix: tuple[str, ...], interpreter: str, config: dict) -> list[str]:
    """The command line of one run: the namespace prefix, then this program with its config.

    `config` holds: workdir, uid (or None), status_fd, private_mounts, tmpfs (mount options),
    interpreter, path (the program's PATH) and rlimits ([name, soft, hard] triples).
    """
    return [*prefix, interpreter, "-I", "-S", "-c", _source(), json.dumps(config)]


def read_status(read_fd: int) -> tuple[str, int | str] | None:
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


def live_pids_of_uid(uid: int) -> list[int]:
    """Processes of `uid` that are not dead yet (zombies left out), from a /proc scan.

    Used on both sides: by the host to sweep a run's uid, and by the bootstrap after the program.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/status" % entry) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


# -- what runs inside the sandbox ------------------------------------------------------------
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(rc: int, what: str) -> None:
        if rc != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, what + ": " + os.strerror(errno))

    return libc, check


def _report(status_fd: int, line: str) -> None:
    os.write(status_fd, (line + "\n").encode())


def _private_mounts(cfg: dict, libc, check) -> str:
    """Fresh tmpfs on the shared temp dirs, the workdir bound at /tmp/work, the root read-only."""
    work = os.open(cfg["workdir"], os.O_PATH | os.O_DIRECTORY)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, cfg["tmpfs"].encode()), "tmpfs " + d)
    os.mkdir("/tmp/work")
    check(libc.mount(("/proc/self/fd/%d" % work).encode(), b"/tmp/work", None, _MS_BIND, None), "bind workdir")
    os.close(work)
    # MS_BIND makes this a per-mount flag of our namespace; without it the host fs would go read-only
    libc.mount(None, b"/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)  # best effort
    return "/tmp/work"


def _sweep(uid: int) -> bool:
    """Kill every process of the run uid, reap what came back to us; True once none is left."""
    pids = live_pids_of_uid(uid)
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    return not pids


def _exec_program(cfg: dict, cwd: str, libc, check) -> None:
    """In the forked child: limits, uid, no new privileges, then the model's interpreter."""
    status = cfg["status_fd"]
    try:
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        check(libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0), "pdeathsig")  # SIGKILL when the bootstrap dies
        os.chdir(cwd)
        os.set_inheritable(status, False)
        env = {"PATH": cfg["path"], "LANG": "C.UTF-8", "HOME": cwd}
        os.execve(cfg["interpreter"], [cfg["interpreter"], "-I", "-S", "-"], env)
    except BaseException as exc:
        _report(status, "setup-failed %s: %s" % (type(exc).__name__, exc))
        os._exit(127)


def main(cfg: dict) -> None:
    libc, check = _libc()
    status = cfg["status_fd"]
    cwd = cfg["workdir"]
    try:
        if cfg["private_mounts"]:
            cwd = _private_mounts(cfg, libc, check)
    except OSError as exc:
        _report(status, "setup-failed %s" % exc)
        sys.exit(127)
    check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")  # orphans of the run come back here
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg, cwd, libc, check)
    _, st = os.waitpid(pid, 0)
    _report(status, "signal %d" % os.WTERMSIG(st) if os.WIFSIGNALED(st) else "exit %d" % os.WEXITSTATUS(st))
    if cfg["uid"] is not None:  # background processes end with the program; a pid namespace does this too
        import time

        for _ in range(400):
            if _sweep(cfg["uid"]):
                break
            time.sleep(0.005)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
