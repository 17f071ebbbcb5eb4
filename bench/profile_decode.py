"""Where a decode step of the built-in engine goes: wall time, device time and host time per step.

Runs workload (a) of `bench/rollout.py` (P prompts x L tokens -> N new, temperature 1) twice per
mode, with async (speculative) steps on and off: once with 1 new token (prefill and the first
sample) and once with N, so `(full - prefill) / (N - 1)` is the time of one decode step. Device
time per step comes from the torch profiler (sum of kernel times, same subtraction). Host time
is split by timing the engine's own methods; `wait` is time the engine thread spent blocked on
the device (event synchronize), so host work per step is roughly `wall - wait`.

Example (GPU):
    PYTHONPATH=. python3 bench/profile_decode.py --prompts 64 --prompt-len 256 --new 256
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bench.rollout import build_model, engine_generate, random_prompts
from agentrl.rollout.backends.embedded import EmbeddedEngine

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name] += time.perf_counter() - t0
    return wrapper


def kernel_seconds(fn) -> dict[str, float]:
    """Device seconds per kernel name over one call of `fn` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: getattr(e, "self_device_time_total", 0) / 1e6 for e in prof.key_averages()
            if getattr(e, "self_device_time_total", 0) > 0}


def device_gaps(fn, threshold_us: float = 200.0) -> None:
    """Print where the device sat idle for more than `threshold_us` during one call of `fn`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    gaps, end = [], spans[0][1]
    for a, b in spans[1:]:
        if a - end > threshold_us:
            gaps.append((end - spans[0][0], a - end))
        end = max(end, b)
    busy = end - spans[0][0]
    print(f"    device idle gaps > {threshold_us:.0f} us: {len(gaps)}, {sum(g for _, g in gaps) / 1e3:.1f} ms of "
          f"{busy / 1e3:.1f} ms (profiled wall {wall * 1e3:.1f} ms); largest: "
          + ", ".join(f"{g / 1e3:.1f} ms at {t / 1e3:.0f}" for t, g in sorted(gaps, key=lambda x: -x[1])[:8]))


def boundary_timeline(engine: EmbeddedEngine, play) -> None:
    """Host timeline around the turn boundaries of workload (c): what runs between two turns."""
    marks: list[tuple[float, str]] = []

    def mark(name, fn):
        def wrapper(*a, **k):
            marks.append((time.perf_counter(), name + ">"))
            out = fn(*a, **k)
            marks.append((time.perf_counter(), "<" + name))
            return out
        return wrapper

    sched = engine._sched
    owners = {"_deliver": engine, "_flush": engine, "_step": engine, "launch": engine._steps,
              "complete": engine._steps, "schedule": sched}
    for n, obj in owners.items():
        setattr(obj, n, mark(n, getattr(obj, n)))
    try:
        play()
    finally:
        for n, obj in owners.items():
            delattr(obj, n)
    # A boundary: the last `<_deliver` before a `_flush>`; print from 1 ms before it to the first eager launch.
    for i, (t, name) in enumerate(marks):
        if name == "_flush>" and i > 10:
            j = max(k for k in range(i) if marks[k][1] == "<_deliver")
            end = next(k for k in range(i, len(marks)) if marks[k][1] == "<launch")
            print("    boundary: " + "  ".join(f"{(marks[k][0] - marks[j][0]) * 1e3:.2f}:{marks[k][1]}"
                                             for k in range(max(j - 6, 0), end + 1)))


def host_profile(engine: EmbeddedEngine, play) -> None:
    """cProfile of the engine thread's steps during one call of `play` (top functions by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    step = engine._step

    def profiled(*a, **k):
        prof.enable()
        try:
            return step(*a, **k)
        finally:
            prof.disable()
    engine._step = profiled
    try:
        play()
    finally:
        del engine._step
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def print_kernels(full: dict[str, float], base: dict[str, float], per: int, top: int = 14) -> None:
    """The kernels of `full` minus `base`, per `per` (steps), largest first."""
    diff = {k: v - base.get(k, 0.0) for k, v in full.items()}
    for name, sec in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {sec / per * 1e6:8.1f} us  {name[:90]}")


def turns(engine: EmbeddedEngine, no_cache: EmbeddedEngine, args) -> None:
    """Workload (c): wall and device time of the whole run, prefix caching on and off."""
    from bench.rollout import engine_turn, episodes

    vocab = engine.vocab_size
    starts = random_prompts(args.prompts, args.prompt_len, vocab, 2)
    for name, eng in (("prefix cache on", engine), ("prefix cache off", no_cache)):
        def play(e=eng):
            return episodes(engine_turn(e), starts, 4, args.obs, args.turn_new, vocab)
        play()
        best = min(_wall(play) for _ in range(3))
        steps0 = eng.stats.extra["steps"]
        kern = kernel_seconds(play)
        steps = eng.stats.extra["steps"] - steps0
        print(f"(c) {name}: {best * 1e3:.1f} ms wall, {sum(kern.values()) * 1e3:.1f} ms in kernels, "
              f"{steps:.0f} steps")
        print_kernels(kern, {}, 1, top=10)
        per_turn = []

        def timed_turns(e=eng):
            gen = engine_turn(e)

            def g(convs, new):
                t0 = time.perf_counter()
                out = gen(convs, new)
                torch.cuda.synchronize()
                per_turn.append(time.perf_counter() - t0)
                return out
            return episodes(g, starts, 4, args.obs, args.turn_new, vocab)
        timed_turns()
        print("    turns (ms):", " ".join(f"{t * 1e3:.1f}" for t in per_turn))
        device_gaps(play)
        boundary_timeline(eng, play)
        if args.cprofile:
            host_profile(eng, play)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            play()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


def _wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--turns", action="store_true", help="also profile workload (c): 4 turns, cache on and off")
    ap.add_argument("--cprofile", action="store_true", help="with --turns: cProfile the engine thread's steps")
    ap.add_argument("--obs", type=int, default=32)
    ap.add_argument("--turn-new", type=int, default=64)
    args = ap.parse_args()
    model = build_model(argparse.Namespace(model=None, random_qwen2_0_5b=True, dtype="bfloat16")).cuda().eval()
    engine = EmbeddedEngine(model, device="cuda", dtype=torch.bfloat16, max_model_len=args.prompt_len + args.new + 8,
                            max_batch_size=args.prompts)
    prompts = random_prompts(args.prompts, args.prompt_len, model.config.vocab_size, 0)
    engine_generate(engine, prompts, args.new)  # warm-up: graphs captured, kernels compiled
    dev_steps = engine._steps
    dev_steps.launch = timed("launch", dev_steps.launch)
    dev_steps.speculate = timed("speculate (incl. its launch)", dev_steps.speculate)
    dev_steps.complete = timed("complete (incl. wait)", dev_steps.complete)
    engine._deliver = timed("deliver", engine._deliver)
    dev_steps.graphs.run = timed("graph stage+upload+replay", dev_steps.graphs.run)
    torch.cuda.Event.synchronize = timed("wait (event synchronize)", torch.cuda.Event.synchronize)
    steps = args.new - 1
    for mode in (True, False):
        engine.async_steps = mode
        sched = engine._sched
        sched.schedule = timed("schedule", type(sched).schedule.__get__(sched))
        sched.finish_step = timed("finish_step", type(sched).finish_step.__get__(sched))
        walls = {}
        for n in (1, args.new):
            best = None
            for _ in range(3):
                TIMES.clear()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine_generate(engine, prompts, n)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if best is None or dt < best[0]:
                    best = (dt, dict(TIMES))
            walls[n] = best
        dev = {n: kernel_seconds(lambda n=n: engine_generate(engine, prompts, n)) for n in (1, args.new)}
        wall = (walls[args.new][0] - walls[1][0]) / steps * 1e3
        device = (sum(dev[args.new].values()) - sum(dev[1].values())) / steps * 1e3
        print(f"async_steps={mode}: decode step {wall:.3f} ms wall, {device:.3f} ms device "
              f"({args.prompts * 1e3 / wall:.0f} tok/s in decode); prefill+first sample {walls[1][0] * 1e3:.1f} ms")
        for name, sec in sorted(walls[args.new][1].items(), key=lambda kv: -kv[1]):
            print(f"    {name:32s} {sec / args.new * 1e3:7.3f} ms/step")
        if mode:
            print("    device time of one decode step by kernel:")
            print_kernels(dev[args.new], dev[1], steps)
    if args.turns:
        longest = args.prompt_len + 4 * (args.obs + args.turn_new) + 8
        big = EmbeddedEngine(model, device="cuda", dtype=torch.bfloat16, max_model_len=longest,
                             max_batch_size=args.prompts)
        off = EmbeddedEngine(model, device="cuda", dtype=torch.bfloat16, max_model_len=longest,
                             max_batch_size=args.prompts, enable_prefix_caching=False)
        turns(big, off, args)


if __name__ == "__main__":
    main()
