"""The bootstrap that starts every sandboxed run, and the host's end of its protocol.

`agentrl.tools.sandbox` starts `python -I -S -c <this file's source> CONFIG_JSON`, as root of
the new namespaces when they work. Run that way, `main` (at the bottom) joins the run's cgroups,
builds the minimal root and pivots into it, becomes the child subreaper (and, in a pid namespace,
init), forks the model's interpreter with rlimits under the per-run uid and without capabilities,
waits for it, writes one status line (`exit N`, `signal N` or `setup-failed WHY`) to the status
fd, and sweeps what is left of the uid.

The minimal root is a read-only tmpfs holding only what a standard-library Python needs: the
system directories (/usr, /bin, /lib...) and the interpreter's own install prefix bound read-only, a
synthetic /etc (passwd, group, hosts; ld.so.cache and localtime from the host), /dev with
null/zero/full/random/urandom, a fresh /proc, and one tmpfs of `disk_bytes` shared by /tmp (the
working dir is /tmp/work), /var/tmp and /dev/shm. The old root is detached, so no host socket,
project file or home directory is reachable. The program runs chrooted one level below the new
root, which makes the kernel refuse it new user namespaces (`current_chrooted()` in
create_user_ns), so it cannot get capabilities back to mount over its own limits.

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
import platform
import resource
import sys
import time

# prctl options, securebits and mount flags from <linux/prctl.h>, <linux/securebits.h>, <sys/mount.h>
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS = 1, 24, 28
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
_SECBIT_NOROOT_AND_LOCKED = 0b11
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 8, 32, 4096
_MS_REC, _MS_PRIVATE, _MNT_DETACH = 1 << 14, 1 << 18, 2
# statvfs f_flag bits that a read-only remount must keep (a user namespace may not clear locked ones)
_KEPT_FLAGS = ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC),
               (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203, "s390x": 217}
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
JAIL = "/jail"  # the program's root, one level below the new root (see the module docstring)
WORKDIR = "/tmp/work"


@functools.cache
def _source() -> str:
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def bootstrap_argv(prefix: tuple[str, ...], interpreter: str, config: dict) -> list[str]:
    """The command line of one run: the namespace prefix, then this program with its config.

    `config` holds: workdir (used without a mount namespace), uid (or None), status_fd,
    private_mounts, disk_bytes (the size of the minimal root's writable tmpfs), cgroup_procs
    (cgroup.procs files to join first), interpreter, path (the program's PATH) and rlimits
    ([name, soft, hard] triples).
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
class _Libc:
    """The few libc calls the standard library lacks, raising OSError on failure."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self.lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, what + ": " + os.strerror(errno))

    def mount(self, source, target: str, fstype, flags: int, data=None) -> None:
        enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
        self.check(self.lib.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), "mount " + target)

    def prctl(self, option: int, arg: int = 0) -> None:
        self.check(self.lib.prctl(option, arg, 0, 0, 0), "prctl %d" % option)

    def pivot_root_here(self) -> None:
        """Make the current directory the root and detach the old one (pivot_root(".", "."))."""
        number = _SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise OSError(0, "pivot_root: no syscall number known for " + platform.machine())
        self.check(self.lib.syscall(number, b".", b"."), "pivot_root")
        self.check(self.lib.umount2(b".", _MNT_DETACH), "detach the old root")


def _report(status_fd: int, line: str) -> None:
    os.write(status_fd, (line + "\n").encode())


def _bind_read_only(libc: _Libc, source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    libc.mount(source, target, None, _MS_BIND)
    kept = sum(ms for st, ms in _KEPT_FLAGS if os.statvfs(target).f_flag & st)
    libc.mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept)


def _etc_files(uid: int | None) -> dict[str, str]:
    users = "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    groups = "root:x:0:\n"
    if uid is not None:
        users += "sandbox:x:%d:%d:sandbox:%s:/usr/sbin/nologin\n" % (uid, uid, WORKDIR)
        groups += "sandbox:x:%d:\n" % uid
    return {"passwd": users, "group": groups, "hosts": "127.0.0.1 localhost\n::1 localhost\n"}


def _build_root(cfg: dict, libc: _Libc, jail: str) -> None:
    """Fill `jail` (a directory on a fresh tmpfs) with the minimal root; see the module docstring."""
    # this process is the program's interpreter: its own prefixes are the install it needs, and
    # only that (never, say, the home directory a python binary happens to sit in)
    prefixes = tuple(sorted({sys.base_prefix, sys.base_exec_prefix} - {"/", ""}))
    for d in _SYSTEM_DIRS + prefixes:
        if os.path.islink(d) and d in _SYSTEM_DIRS:
            os.symlink(os.readlink(d), jail + d)  # /bin -> usr/bin on merged-/usr systems
        elif os.path.isdir(d) and not os.path.exists(jail + d):
            _bind_read_only(libc, d, jail + d)
    os.mkdir(jail + "/etc")
    for name, text in _etc_files(cfg["uid"]).items():
        with open(jail + "/etc/" + name, "w") as f:
            f.write(text)
    if os.path.exists("/etc/ld.so.cache"):
        _bind_read_only(libc, "/etc/ld.so.cache", jail + "/etc/ld.so.cache")
    if os.path.islink("/etc/localtime"):
        os.symlink(os.readlink("/etc/localtime"), jail + "/etc/localtime")
    for name in _DEVICES:
        _bind_device(libc, "/dev/" + name, jail + "/dev/" + name)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, jail + "/dev/" + name)
    os.mkdir(jail + "/proc")
    libc.mount("proc", jail + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _writable_dirs(cfg, libc, jail)


def _bind_device(libc: _Libc, source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    open(target, "w").close()
    libc.mount(source, target, None, _MS_BIND)  # keeps the device usable: no nodev on this mount


def _writable_dirs(cfg: dict, libc: _Libc, jail: str) -> None:
    """One tmpfs of `disk_bytes` behind /tmp, /var/tmp and /dev/shm: one quota for all writes."""
    scratch = jail + "/.quota"
    os.mkdir(scratch)
    size, inodes = cfg["disk_bytes"], max(1024, cfg["disk_bytes"] // 4096)  # inodes cost kernel memory too
    libc.mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=%d,nr_inodes=%d,mode=755" % (size, inodes))
    for name, target in (("tmp", "/tmp"), ("var-tmp", "/var/tmp"), ("shm", "/dev/shm")):
        os.mkdir(scratch + "/" + name, 0o1777)
        os.chmod(scratch + "/" + name, 0o1777)  # past the umask
        os.makedirs(jail + target, exist_ok=True)
        libc.mount(scratch + "/" + name, jail + target, None, _MS_BIND)
    os.mkdir(jail + WORKDIR, 0o700)
    if cfg["uid"] is not None:
        os.chown(jail + WORKDIR, cfg["uid"], cfg["uid"])
    libc.check(libc.lib.umount2(scratch.encode(), _MNT_DETACH), "detach " + scratch)  # the binds keep it alive
    os.rmdir(scratch)


def _minimal_root(cfg: dict, libc: _Libc) -> str:
    """Build the minimal root on a fresh tmpfs over /tmp, pivot into it, chroot to its jail."""
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount may reach the host's namespace
    libc.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    os.mkdir("/tmp" + JAIL)
    _build_root(cfg, libc, "/tmp" + JAIL)
    os.chdir("/tmp")
    libc.pivot_root_here()
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chroot(JAIL)
    os.chdir("/")  # the old working directory is outside the jail
    return WORKDIR


def _join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")  # 0 is the writer itself; its children are born inside


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


def _set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:  # lowering needs CAP_SYS_RESOURCE: not ours without root
        pass


def _drop_capabilities(libc: _Libc) -> None:
    """Empty the bounding and ambient sets and lock `noroot`: an exec by uid 0 gains nothing.

    This is what keeps a program that stays uid 0 (inside a user namespace, without root on the
    host) from holding the namespace's capabilities. EPERM means we hold none to drop.
    """
    for cap in range(64):
        if libc.lib.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 1:  # EPERM: no CAP_SETPCAP, so no capabilities at all
                return
            break  # EINVAL: past the last capability of this kernel
    libc.lib.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before 4.3: no ambient set
    libc.prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT_AND_LOCKED)


def _exec_program(cfg: dict, cwd: str, libc: _Libc) -> None:
    """In the forked child: limits, no capabilities, uid, no new privileges, then the interpreter."""
    status = cfg["status_fd"]
    try:
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        _set_oom_score_adj(1000)  # the first to go in any out-of-memory kill, the host's own included
        _drop_capabilities(libc)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
        libc.prctl(_PR_SET_PDEATHSIG, 9)  # SIGKILL when the bootstrap dies
        os.chdir(cwd)
        os.set_inheritable(status, False)
        env = {"PATH": cfg["path"], "LANG": "C.UTF-8", "HOME": cwd}
        os.execve(cfg["interpreter"], [cfg["interpreter"], "-I", "-S", "-"], env)
    except BaseException as exc:
        _report(status, "setup-failed %s: %s" % (type(exc).__name__, exc))
        os._exit(127)


def main(cfg: dict) -> None:
    libc = _Libc()
    status = cfg["status_fd"]
    cwd = cfg["workdir"]
    try:
        _join_cgroups(cfg["cgroup_procs"])
        if cfg["private_mounts"]:
            cwd = _minimal_root(cfg, libc)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the run come back here
        _set_oom_score_adj(-1000)  # at the cgroup's limit the program dies, not the one who reports it
    except OSError as exc:
        _report(status, "setup-failed %s" % exc)
        sys.exit(127)
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg, cwd, libc)
    _, st = os.waitpid(pid, 0)
    _report(status, "signal %d" % os.WTERMSIG(st) if os.WIFSIGNALED(st) else "exit %d" % os.WEXITSTATUS(st))
    if cfg["uid"] is not None:  # background processes end with the program; a pid namespace does this too
        for _ in range(400):
            if _sweep(cfg["uid"]):
                break
            time.sleep(0.005)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
