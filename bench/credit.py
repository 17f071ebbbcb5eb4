"""Credit assignment on a many-turn env with per-step rewards: outcome GRPO vs turn_rloo vs PPO with a critic.

The env is CliffWalking through the Gymnasium text adapter (`gym-cliffwalking-v0`: a random safe
start cell per task, -1 per step, -100 and back to the start for a step onto the cliff, the episode
ends at the goal), with one change, registered here as `cliffwalking-stepcost-v0`: a reply that is
not a readable action costs -1 like a step (the adapter gave it 0, which would pay the policy to
stop moving; `gym-cliffwalking-v0` now charges the -1 itself and says so in its reply, so the
subclass changes nothing any more and a rerun sees that one extra sentence the published runs did not). For the same reason every run sets `algorithm.truncation_penalty` (100, a fall): a
turn that never ends never reaches the env, so without it the best policy writes on until the token
budget. Each run trains the same tiny model (built here by the tiny-model recipe from the adapter's
scripted demonstrator, which plays the optimal action half of the time and a random one otherwise)
with one estimator, the same budget (steps x tasks x samples) and the same seed set; only
`algorithm.advantage` (and, for `gae`, the critic's settings) differ. It then scores each final
policy, and the starting one, on held-out tasks of the test split.

Example (CPU, one to three minutes per run on two cores; nine runs):
    PYTHONPATH=. python3 bench/credit.py --out runs/credit --json docs/credit.json --svg docs/credit.svg
    PYTHONPATH=. python3 bench/credit.py --steps 2 --seeds 0 --sft-steps 20 --eval-tasks 8 --out /tmp/c  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from agentrl.config import load_config
from agentrl.driver.loop import train
from agentrl_gym_text.games import CliffWalkingTextEnv  # environments/gym_text (installed beside agentrl)
from agentrl.envs.registration import ENVS, register
from agentrl.recipes.tiny_model import build_tiny_model

ENV_ID = "cliffwalking-stepcost-v0"
CUT_PENALTY = 100.0  # algorithm.truncation_penalty: a turn that never ends costs what a fall off the cliff does
METHODS = {
    "grpo": [],  # outcome-only: every token of an episode gets its group-normalised return
    "turn_rloo": ["algorithm.advantage=turn_rloo"],
    "gae": ["algorithm.advantage=gae", "critic.lr=1e-3", "critic.warmup_steps=2"],
}


class StepCostCliffWalking(CliffWalkingTextEnv):
    """CliffWalking where an unreadable reply costs a step (-1) instead of nothing."""

    def step(self, action: str):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, (-1.0 if info.get("invalid_action") else reward), terminated, truncated, info


def ensure_env() -> None:
    if ENV_ID not in ENVS:
        register(ENV_ID, StepCostCliffWalking)


def config(model: str, run_dir: Path, method: str, seed: int, steps: int, eval_tasks: int = 200):
    return load_config(None, [
        f"model.path={model}", f"env.id={ENV_ID}", f"run_dir={run_dir}", f"train.seed={seed}", f"train.steps={steps}",
        "rollout.prompts_per_step=6", "rollout.samples_per_prompt=4", "rollout.max_turns=5",
        "rollout.max_tokens_per_turn=16", "rollout.max_total_tokens=1024", "optim.lr=3e-4", "optim.warmup_steps=2",
        "train.checkpoint_every=0", f"eval.num_tasks={eval_tasks}", "eval.before=false", "metrics.tensorboard=false",
        f"algorithm.truncation_penalty={CUT_PENALTY}",
        *METHODS[method]])


def goal_rate(metrics: dict) -> float:
    """Share of episodes that reached the goal (the rest were cut: by rollout.max_turns or a token budget)."""
    cut = sum(v for k, v in metrics.items() if k.startswith("truncated/"))
    return 1.0 - cut / max(metrics["episodes"], 1.0)


def cut_share(metrics: dict) -> float:
    """Share of episodes a token budget cut short (a turn that never ended)."""
    cut = sum(metrics.get(f"truncated/{k}", 0.0) for k in ("max_tokens_per_turn", "max_total_tokens"))
    return cut / max(metrics["episodes"], 1.0)


def objective(metrics: dict) -> float:
    """The return training maximises: the env's reward less the truncation penalty (`reward_mean` is the
    env's alone, so a policy that never finishes a turn would score 0 there, better than any walk)."""
    return metrics["reward_mean"] - CUT_PENALTY * cut_share(metrics)


def held_out(metrics: dict) -> dict:
    return {"eval_return": objective(metrics), "eval_env_reward": metrics["reward_mean"],
            "eval_goal_rate": goal_rate(metrics), "eval_cut_share": cut_share(metrics),
            "eval_tasks": int(metrics["scored_tasks"])}


def run_one(model: str, out: Path, method: str, seed: int, steps: int, eval_tasks: int = 200) -> dict:
    """Train one estimator with one seed, then evaluate on `eval_tasks` held-out tasks."""
    t0 = time.perf_counter()
    result = train(config(model, out / f"{method}-seed{seed}", method, seed, steps, eval_tasks), overwrite=True)
    hist = result["history"]
    return {"method": method, "seed": seed, "seconds": time.perf_counter() - t0,
            "train_return": [objective(m) for m in hist], "train_goal_rate": [goal_rate(m) for m in hist],
            "train_cut_share": [cut_share(m) for m in hist], **held_out(result["after"])}


def evaluate_model(model: str, run_dir: Path, tasks: int) -> dict:
    """The held-out scores of a saved policy (a run of zero steps evaluates it, as every run evaluates)."""
    return held_out(train(config(model, run_dir, "grpo", 0, 0, tasks), overwrite=True)["after"])


def summary_table(runs: list[dict], last: int) -> str:
    """Markdown: per method, the mean (and each seed's value) of the held-out return, goal rate and share
    of episodes cut short, and of the training return over the last `last` steps."""
    lines = ["| estimator | held-out return | held-out goal rate | held-out cut short | training return, last "
             f"{last} steps | minutes per run |", "|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ({', '.join(f'{x:.2f}' for x in values)})"

    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if rs:
            tail = [statistics.mean(r["train_return"][-last:]) for r in rs]
            lines.append(f"| `{method}` | {cell([r['eval_return'] for r in rs])} | "
                         f"{cell([r['eval_goal_rate'] for r in rs])} | {cell([r['eval_cut_share'] for r in rs])} | "
                         f"{cell(tail)} | {statistics.mean(r['seconds'] for r in rs) / 60:.1f} |")
    return "\n".join(lines)


def svg_curves(runs: list[dict], smooth: int = 5, width: int = 640, height: int = 360) -> str:
    """Training return per step (moving average over `smooth` steps), the mean over seeds per method as a
    line and the seeds' range as a band: a small self-contained SVG."""
    colours = {"grpo": "#888888", "turn_rloo": "#1f77b4", "gae": "#d62728"}
    pad_l, pad_r, pad_t, pad_b = 60, 130, 20, 40
    curves = {}
    for method in METHODS:
        rs = [r["train_return"] for r in runs if r["method"] == method]
        if rs:
            sm = [[statistics.mean(c[max(0, i - smooth + 1):i + 1]) for i in range(len(c))] for c in rs]
            curves[method] = [(statistics.mean(col), min(col), max(col)) for col in zip(*sm)]
    steps = max(len(c) for c in curves.values())
    lo = min(v[1] for c in curves.values() for v in c)
    hi = max(v[2] for c in curves.values() for v in c)
    hi = hi if hi > lo else lo + 1.0

    def x(i: float) -> float:
        return pad_l + (width - pad_l - pad_r) * i / max(steps - 1, 1)

    def y(v: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="black"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="black"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<text x="{pad_l - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for i in range(0, steps, max(1, steps // 5)):
        parts.append(f'<text x="{x(i):.1f}" y="{height - pad_b + 16}" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{(pad_l + width - pad_r) / 2}" y="{height - 6}" text-anchor="middle">training step</text>')
    mid = (pad_t + height - pad_b) / 2
    parts.append(f'<text x="14" y="{mid}" transform="rotate(-90 14 {mid})" text-anchor="middle">'
                 f'episode return (moving mean of {smooth})</text>')
    for n, (method, c) in enumerate(curves.items()):
        band = [f"{x(i):.1f},{y(v[2]):.1f}" for i, v in enumerate(c)] + \
               [f"{x(i):.1f},{y(v[1]):.1f}" for i, v in reversed(list(enumerate(c)))]
        parts.append(f'<polygon points="{" ".join(band)}" fill="{colours[method]}" fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{x(i):.1f},{y(v[0]):.1f}" for i, v in enumerate(c))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colours[method]}" stroke-width="2"/>')
        ly = pad_t + 16 + 18 * n
        parts.append(f'<line x1="{width - pad_r + 10}" y1="{ly - 4}" x2="{width - pad_r + 30}" y2="{ly - 4}" '
                     f'stroke="{colours[method]}" stroke-width="2"/>')
        parts.append(f'<text x="{width - pad_r + 36}" y="{ly}">{method}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/credit", help="run directories and the tiny model go here")
    ap.add_argument("--model", default=None, help="a tiny model to reuse (default: build one in OUT/model)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks each final policy is scored on")
    ap.add_argument("--reevaluate", action="store_true", help="score the final policies of the runs in --json "
                    "(and the starting model) on --eval-tasks tasks again, without training")
    ap.add_argument("--json", default=None, help="write every run's curves and scores here")
    ap.add_argument("--svg", default=None, help="write the training curves here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the runs are small; one thread is faster than contended ones
    ensure_env()
    out = Path(args.out)
    model = args.model or str(out / "model")
    if not (Path(model) / "config.json").exists():
        build_tiny_model(model, ENV_ID, sft_steps=args.sft_steps, tool_use_prob=0.5, seed=0)
    if args.reevaluate:
        record = json.loads(Path(args.json).read_text())
        for r in record["runs"]:
            final = out / f"{r['method']}-seed{r['seed']}" / "final"
            r.update(evaluate_model(str(final), out / "eval", args.eval_tasks))
    else:
        record = {"steps": args.steps, "runs": []}
        for seed in args.seeds:
            for method in args.methods:
                record["runs"].append(run_one(model, out, method, seed, args.steps, args.eval_tasks))
                r = record["runs"][-1]
                print(f"{method:10s} seed {seed}: held-out return {r['eval_return']:.2f}, goal rate "
                      f"{r['eval_goal_rate']:.2f}, cut short {r['eval_cut_share']:.2f}, {r['seconds']:.0f} s",
                      flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(record, indent=1))
    record["start"] = evaluate_model(model, out / "eval", args.eval_tasks)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    s = record["start"]
    print(f"starting policy: held-out return {s['eval_return']:.2f}, goal rate {s['eval_goal_rate']:.2f}, "
          f"cut short {s['eval_cut_share']:.2f}")
    print(summary_table(record["runs"], last=5))
    if args.svg:
        Path(args.svg).write_text(svg_curves(record["runs"]))


if __name__ == "__main__":
    main()
