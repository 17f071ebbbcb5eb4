"""Shared by the sandbox tests: what a sandbox run may have left behind (imported as `leftovers`)."""

from __future__ import annotations

import os


def scan_leftover_processes() -> list[tuple[int, str, str]]:
    """(pid, state, cmdline head) of every live or zombie process this test process's runs left.

    That is: a process under one of the per-run uids this process hands out (2**31 + pid-derived
    slot, see `agentrl.tools.sandbox_workdir._UidPool`), a child of this process (unshare or the
    bootstrap, not reaped), or, without root, a `python -I -S -` interpreter (forked children
    inherit its argv).
    """
    base = 2**31 + (os.getpid() % 2**22) * 256
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        uid, ppid = int(status["Uid"].split()[0]), int(status["PPid"])
        user_code = os.geteuid() != 0 and uid == os.geteuid() and cmdline.endswith(b"-I\x00-S\x00-\x00")
        if base <= uid < base + 256 or ppid == os.getpid() or user_code:
            found.append((int(entry), status["State"].strip(), cmdline[:80].decode(errors="replace")))
    return found
