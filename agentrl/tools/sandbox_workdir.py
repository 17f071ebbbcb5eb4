"""The host's side of one sandboxed run's identity and files: its uid, its working directory.

With a mount namespace the run's files live on its own tmpfs and vanish with it (see
`sandbox_bootstrap`); this module then only hands out the uid. Without one, the run writes to a
host directory and, being a process of the host, to the host's shared temp dirs; then this
module also measures what the run's uid has written there (`disk_bytes_used`, polled by the
sandbox, which kills the run past its disk limit) and removes it after the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from agentrl.tools.sandbox_bootstrap import live_pids_of_uid

logger = logging.getLogger(__name__)

UID_BASE = 2**31  # far above login, system and systemd container uids
UID_SLOTS = 256
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class _UidPool:
    """Hands out uids that no other run, in this process or another, holds at the same time.

    A uid is UID_BASE + (host pid mod 2**22) * UID_SLOTS + slot: distinct processes get
    distinct ranges, and `tests/tools/leftovers.py` finds a test process's runs by that range.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def acquire(self) -> int:
        with self._lock:
            slot = next((s for s in range(UID_SLOTS) if s not in self._used), None)
            if slot is None:
                raise RuntimeError(f"more than {UID_SLOTS} sandbox runs at once in one process")
            self._used.add(slot)
        return UID_BASE + (os.getpid() % 2**22) * UID_SLOTS + slot

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.discard((uid - UID_BASE) % UID_SLOTS)


_uids = _UidPool()


@contextlib.contextmanager
def run_identity(per_run_uid: bool, host_workdir: bool) -> Iterator[tuple[str | None, int | None]]:
    """(host working dir or None, uid or None) of one run; everything of it is gone afterwards.

    The host dir (only wanted without a mount namespace) is fresh, 0700 and owned by the uid.
    """
    uid = _uids.acquire() if per_run_uid else None
    workdir = tempfile.mkdtemp(prefix="agentrl-sandbox-") if host_workdir else None
    try:
        if uid is not None and workdir is not None:
            os.chown(workdir, uid, uid)
        yield workdir, uid
    finally:
        kill_uid(uid)  # covers a cancellation that came before the run's own cleanup
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
            if uid is not None:
                _remove_owned_temp_entries(uid)
        if uid is not None:
            _uids.release(uid)


def kill_until_gone(list_pids: Callable[[], list[int]], what: str) -> None:
    """SIGKILL the processes `list_pids` names until it names none (a fork may race a round)."""
    for _ in range(200):
        pids = list_pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    logger.error("%s still has processes after repeated SIGKILL", what)


def kill_uid(uid: int | None) -> None:
    """SIGKILL every process of the run's own uid until none is left (no-op without one)."""
    if uid is not None:
        kill_until_gone(lambda: live_pids_of_uid(uid), f"sandbox uid {uid}")


def _owned_temp_entries(uid: int) -> list[str]:
    out = []
    for d in SHARED_TEMP_DIRS:
        with contextlib.suppress(OSError), os.scandir(d) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        out.append(entry.path)
    return out


def _remove_owned_temp_entries(uid: int) -> None:
    # rmtree works through directory fds (no symlink is followed), so a run cannot steer it
    for path in _owned_temp_entries(uid):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def disk_bytes_used(workdir: str, uid: int | None) -> int:
    """Bytes allocated under `workdir` and, with a per-run uid, under its entries in the shared temp dirs."""
    total = 0
    for root in [workdir] + (_owned_temp_entries(uid) if uid is not None else []):
        with contextlib.suppress(OSError):
            total += os.lstat(root).st_blocks * 512
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
