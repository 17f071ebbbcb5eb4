"""Counting the processes a Ray test started, to check that none is left once the run's sides are closed.

`tag` (a fixture) puts a value unique to the test in this process's environment; every process the
test starts inherits it: Ray's GCS, raylet and agents, the workers, and whatever those start, reparented
or not. `ours(tag)` lists the live ones. The run must start its own Ray (so closing it ends them all).
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

TAG = "AGENTRL_RAY_FAULT_TEST"


def ours(tag: str) -> list[psutil.Process]:
    """Live processes other than this one that carry `tag` in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture()
def tag(monkeypatch, tmp_path):
    """A tag every process the test starts inherits; after the test, none of them may be left."""
    import ray

    assert not ray.is_initialized()  # the run starts its own Ray, so closing it must end every process
    value = f"{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv(TAG, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two engines and the trainer on a few cores
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield value
    deadline = time.monotonic() + 15  # a moment for Ray's processes to end and be reaped
    while ours(value) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = ours(value) + [p for p in psutil.Process().children(recursive=True) if p.pid not in before
                          and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
