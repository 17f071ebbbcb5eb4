"""Workload `train` of bench/e2e.py: whole `agentrl train` steps of one GRPO job, run as users run it.

Each variant is the `agentrl train` command line (a subprocess of its own, GPUs given through
CUDA_VISIBLE_DEVICES) on the same job: calculator-v0, 32 prompts x 8 samples, up to 512 new tokens
per turn, a random model of the Qwen2-0.5B shape with the tiny tokenizer (ids past its vocabulary
decode to nothing, as with checkpoints whose embedding is padded), bf16 engine, float32 master
weights (`train.mixed_precision=bf16`). A variant differs only in config overrides (and, for a
baseline, in the source tree it runs). Its `metrics.jsonl` gives the numbers: seconds per step,
tokens the trainer processed per second per GPU (prompt and response tokens of the trained
episodes), the time split by role and the staleness histogram. The first `--warmup` steps
(compilation, CUDA graph capture, allocator growth) and the last (final checkpoint) are left out.

Letters in the variant names: sync/async schedule; coloc = one GPU shared by engine and trainer
with the engine asleep during the update; disagg = engine on its own GPU (`rollout.device`).

Example (two GPUs; one-GPU variants run two at a time):
    PYTHONPATH=. python bench/e2e.py --workload train --tokenizer models/tiny-calculator --json out.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

JOB = [
    "env.id=calculator-v0", "rollout.prompts_per_step=32", "rollout.samples_per_prompt=8",
    "rollout.max_tokens_per_turn=512", "rollout.max_total_tokens=1024", "model.dtype=bfloat16",
    "train.mixed_precision=bf16", "eval.num_tasks=0", "train.checkpoint_every=0", "optim.lr=1e-6",
    "optim.warmup_steps=0",
]


@dataclass
class Variant:
    name: str
    overrides: list[str]
    gpus: int = 1
    src: str | None = None  # another source tree (a baseline commit), else this checkout
    env: dict[str, str] = field(default_factory=dict)


def variants(baseline_src: str | None, two_gpus: bool) -> list[Variant]:
    """The variants of one run, in the order they are started."""
    tuned = ["train.micro_batch_tokens=32768"]
    xl = ["train.micro_batch_tokens=65536", "train.logprob_chunk=8192"]
    ratio = ["train.schedule=asynchronous", "train.max_staleness=1", "algorithm.old_logprobs=rollout"]
    tis = ["train.schedule=asynchronous", "train.max_staleness=1", "algorithm.tis=token",
           "algorithm.old_logprobs=recompute"]
    split = ["model.device=cuda:0", "rollout.device=cuda:1"]
    out = []
    if baseline_src:
        out.append(Variant("baseline sync (before this change)", ["train.compile=false"], src=baseline_src))
    out += [
        Variant("sync", ["train.compile=false"]),
        Variant("sync compile", ["train.compile=true"] + tuned),
        Variant("sync compile xl", ["train.compile=true"] + xl),
        Variant("sync coloc compile", ["train.compile=true", "cluster.colocate=true"] + tuned),
        Variant("sync coloc compile xl", ["train.compile=true", "cluster.colocate=true"] + xl),
        Variant("async shared compile", ["train.compile=true"] + tuned + ratio),
    ]
    if two_gpus:
        out += [
            Variant("async disagg compile", ["train.compile=true"] + split + tuned + ratio, gpus=2),
            Variant("async disagg compile xl", ["train.compile=true"] + split + xl + ratio, gpus=2),
            Variant("async disagg compile tis", ["train.compile=true"] + split + tuned + tis, gpus=2),
            Variant("sync disagg compile", ["train.compile=true"] + split + tuned, gpus=2),
        ]
    return out


#: On CPU (the smoke test): a tiny shape and a job small enough to take seconds; later overrides win.
CPU_JOB = ["model.device=cpu", "model.dtype=float32", "train.mixed_precision=none", "rollout.prompts_per_step=2",
           "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16"]
SHAPES = {"qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936),
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=2048)}


def make_model(tokenizer_dir: str, out: Path, shape: str = "qwen2-0.5b") -> Path:
    """A random model of `shape` (bf16 on disk) with the tokenizer files of `tokenizer_dir`."""
    if (out / "config.json").exists():
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def launch(v: Variant, model: Path, run_dir: Path, steps: int, devices: list[int] | None) -> subprocess.Popen:
    """Start `agentrl train` for `v` on `devices` (CUDA indices; None: on CPU, scaled down)."""
    env = dict(os.environ, **v.env)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    if v.src:
        env["PYTHONPATH"] = os.pathsep.join([v.src] + [p for p in [env.get("PYTHONPATH")] if p])
    device = [] if any(o.startswith("model.device=") for o in v.overrides) else ["model.device=cuda"]
    scaled = CPU_JOB if devices is None else []
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(f"model:\n  path: {model}\nenv:\n  id: calculator-v0\n")
    cmd = [sys.executable, "-m", "agentrl.cli", "train", str(config), "--overwrite", *JOB, *device,
           f"train.steps={steps}", f"run_dir={run_dir}", *v.overrides, *scaled]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=v.src or None)


def summarize(v: Variant, run_dir: Path, warmup: int) -> dict:
    """Means over the steady steps of a finished run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = rows[warmup:-1] or rows[-1:]

    def mean(key: str) -> float:
        return statistics.fmean(r.get(key, 0.0) for r in steady)

    step_s = mean("time/step")
    out = {"variant": v.name, "overrides": v.overrides, "gpus": v.gpus, "steps_timed": len(steady),
           "s_per_step": round(step_s, 3),
           "tok_per_s_per_gpu": round(mean("tokens/trainer/processed") / step_s / v.gpus, 1),
           "generated_tok_per_s": round(mean("tokens/rollout/generated") / step_s, 1)}
    for key in sorted({k for r in steady for k in r if k.startswith("time/") and k != "time/step"}):
        out[key] = round(mean(key), 4)
    hist: dict[str, float] = {}
    for r in steady:
        for k, c in r.items():
            if k.startswith("staleness/") and k[len("staleness/"):].isdigit():
                hist[k] = hist.get(k, 0.0) + c
    out["staleness_tokens"] = hist
    return out


def run_all(args) -> list[dict]:
    import torch

    n_gpus = torch.cuda.device_count()
    cpu = n_gpus == 0  # the smoke test: a tiny model, a scaled-down job, the variants that run on CPU
    work = Path(args.work_dir)
    shape = "tiny" if cpu else "qwen2-0.5b"
    model = make_model(args.tokenizer, work / f"{shape}-random", shape)
    todo = variants(args.baseline_src, n_gpus >= 2)
    if cpu:  # one-GPU layouts only, uncompiled (compiling the tiny model would be most of the time)
        todo = [Variant(v.name, [o.replace("compile=true", "compile=false") for o in v.overrides], src=v.src)
                for v in todo if v.gpus == 1]
        n_gpus = 1
    if args.only:
        todo = [v for v in todo if v.name in args.only.split(",")]
    results, running, free = [], [], list(range(n_gpus))
    while todo or running:
        while todo and len(free) >= todo[0].gpus:
            v = todo.pop(0)
            devices, free = free[:v.gpus], free[v.gpus:]
            run_dir = work / "runs" / v.name.replace(" ", "_").replace("(", "").replace(")", "")
            print(f"start {v.name} on GPU {devices}", flush=True)
            proc = launch(v, model, run_dir, args.steps, None if cpu else devices)
            running.append((v, run_dir, devices, time.perf_counter(), proc))
            if todo and todo[0].gpus > len(free):
                break  # a wider variant waits for the GPUs instead of being overtaken
        time.sleep(1.0)
        for item in list(running):
            v, run_dir, devices, t0, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            free = sorted(free + devices)
            if proc.returncode != 0:
                tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
                print(f"FAILED {v.name} (exit {proc.returncode}):\n{tail}", flush=True)
                results.append({"variant": v.name, "failed": proc.returncode, "log_tail": tail})
                continue
            r = summarize(v, run_dir, args.warmup)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


def report(results: list[dict]) -> None:
    """A table with ratios against the first (baseline) variant and the one-GPU colocated one."""
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return
    base = ok[0]
    coloc = next((r for r in ok if r["variant"] == "sync coloc compile"), None)
    print(f"{'variant':38s} {'s/step':>7s} {'tok/s/GPU':>10s} {'x base':>7s} {'steps/s x coloc':>16s} "
          f"{'update':>7s} {'rollout':>8s} {'sync':>7s}")
    for r in ok:
        vs_coloc = f"{r['s_per_step'] and coloc['s_per_step'] / r['s_per_step']:.2f}" if coloc else "-"
        print(f"{r['variant']:38s} {r['s_per_step']:7.2f} {r['tok_per_s_per_gpu']:10.0f} "
              f"{r['tok_per_s_per_gpu'] / base['tok_per_s_per_gpu']:7.2f} {vs_coloc:>16s} "
              f"{r.get('time/trainer/update', 0):7.2f} {r.get('time/rollout/episodes', 0):8.2f} "
              f"{1000 * r.get('time/trainer/weight_sync', 0):5.0f}ms")
