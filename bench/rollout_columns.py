"""The columns of bench/rollout.py and bench/rollout_long.py that run in child processes, and the one table.

An engine given an install folder (`--backend-site LABEL=PATH`) is timed by bench/rollout_backend.py in a
process of its own with PATH on its import path: SGLang 0.5.17 and vLLM 0.24.0 pin different versions of
packages they share, and an engine's scheduler processes would otherwise run beside the other columns'
timings. This module only starts those processes and merges their rows; it imports neither engine.
"""

from __future__ import annotations

import json
import os
import sys

import torch

def parse_sites(items: list[str]) -> dict[str, str]:
    """`--backend-site LABEL=PATH` arguments as {label: path}; a malformed one stops the run saying so."""
    sites = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--backend-site {item!r}: expected LABEL=PATH[:PATH...], e.g. sglang=/tmp/site_sglang")
        sites[label] = path
    return sites


def run_isolated(args, model_path: str, sites: dict[str, str], sz, sweep: list[int], max_model_len: int,
                 vocab: int, rows: list[dict]) -> list[dict]:
    """Time each backend of `sites` (label -> import path) in a child process (`sz`: bench/rollout.py's Sizes);
    returns their rows with the ratios to this process's HF `generate` and built-in rows, and prints every
    column in one table."""
    import dataclasses
    import gc
    import subprocess
    import tempfile

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    options = json.loads(args.engine_options)
    new_rows = []
    for item in [i for i in args.backends.split(",") if i and (i.rpartition("=")[0] or i) in sites]:
        label = item.rpartition("=")[0] or item
        name = item.rpartition("=")[2]
        opts = {**({"mem_fraction_static": 0.35} if name == "sglang" else {}), **options.get(label, {})}
        out = tempfile.mktemp(suffix=".json", prefix=f"agentrl-bench-{label}-")
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "rollout_backend.py"), "--model", model_path, "--backend", item,
               "--device", args.device, "--dtype", args.dtype, "--options", json.dumps(opts),
               "--sizes", json.dumps(dataclasses.asdict(sz)), "--workloads", args.workloads,
               "--sweep", ",".join(map(str, sweep)), "--repeats", str(args.repeats),
               "--max-model-len", str(max_model_len), "--vocab", str(vocab), "--json", out]
        path = os.pathsep.join(p for p in (root, sites[label], os.environ.get("PYTHONPATH", "")) if p)
        print(f"-- {label}: a child process with PYTHONPATH={path}", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path})
        if done.returncode != 0:
            print(f"-- {label}: the child process failed with exit code {done.returncode}; no column", flush=True)
            continue
        with open(out) as f:
            new_rows += json.load(f)
        os.unlink(out)
    by = {(r["workload"], r["backend"]): r["tok_per_s"] for r in rows}
    for r in new_rows:
        for base in ("hf_generate", "embedded"):
            if (r["workload"], base) in by:
                r[f"vs_{'hf' if base == 'hf_generate' else base}"] = round(r["tok_per_s"] / by[r["workload"], base], 2)
    print_table(rows + new_rows)
    return new_rows


def print_table(rows: list[dict]) -> None:
    """new tokens/s, one row per workload, one column per backend."""
    cols = list(dict.fromkeys(r["backend"] for r in rows))
    cells = {(r["workload"], r["backend"]): r["tok_per_s"] for r in rows}
    print("| workload | " + " | ".join(cols) + " |", flush=True)
    print("|---|" + "---:|" * len(cols), flush=True)
    for w in dict.fromkeys(r["workload"] for r in rows):
        print(f"| {w} | " + " | ".join(f"{cells[w, c]:,.0f}" if (w, c) in cells else "-" for c in cols) + " |",
              flush=True)
