"""What checkpoint integrity costs: a save and a load with manifest hashing, against the same without.

    PYTHONPATH=. python bench/checkpoint.py --gib 1

The state is float32 "weights" plus two AdamW-like moments of the same size (a third each), as
`save_run` writes for a full fine-tune. Prints the median seconds of each phase; the difference between
the checkpoint functions and plain torch.save/torch.load is what the manifest (one sha256 pass) adds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agentrl.trainer.checkpoint import _digest, load_checkpoint, save_checkpoint


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the state in GiB")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each phase (the median is printed)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    n = int(args.gib * 2**30 / 4 / 3)  # float32 elements per tensor
    torch.manual_seed(0)
    state = {"policy": {"w": torch.randn(n)}, "optimizer": {"m": torch.randn(n), "v": torch.rand(n)}, "step": 1}
    raw = root / "raw.pt"

    def raw_save() -> None:
        torch.save(state, raw)
        with open(raw, "rb") as f:
            os.fsync(f.fileno())

    r = args.repeats
    t_raw_save = _median_s(raw_save, r)
    t_hash = _median_s(lambda: _digest(raw), r)
    t_raw_load = _median_s(lambda: torch.load(raw, map_location="cpu", weights_only=True), r)
    raw.unlink()
    t_save = _median_s(lambda: save_checkpoint(root / "run", 1, state), r)
    path = root / "run" / "checkpoints" / "step-000001"
    t_load = _median_s(lambda: load_checkpoint(path), r)
    size = (path / "state.pt").stat().st_size / 2**30
    print(f"state.pt {size:.2f} GiB in {root}; median of {r}")
    print(f"sha256 of state.pt          {t_hash:6.2f} s  ({size / t_hash:.2f} GiB/s)")
    print(f"torch.save + fsync          {t_raw_save:6.2f} s")
    print(f"save_checkpoint             {t_save:6.2f} s  (+{t_save - t_raw_save:.2f} s)")
    print(f"torch.load                  {t_raw_load:6.2f} s")
    print(f"load_checkpoint (verified)  {t_load:6.2f} s  (+{t_load - t_raw_load:.2f} s)")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
