"""The README's walk-through, command by command, as a new user would run it (with fewer steps).

The commands are read from README.md's bash block, so the README cannot drift from what works.
Each runs as a real `agentrl` process in a scratch directory; only the sizes are overridden.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
REPO = HERE.parents[1]
# Smaller than the README's run, same commands: CI has two cores and minutes, not hours.
SMALLER = {
    "tiny-model": ["--sft-steps", "20", "--demos", "160"],
    "train": ["train.steps=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "eval.num_tasks=4",
              "train.checkpoint_every=0"],
    "eval": ["eval.num_tasks=4"],
}


def readme_commands() -> list[list[str]]:
    text = (HERE / "README.md").read_text()
    block = re.search(r"## Walk-through.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_readme_walk_through_runs(tmp_path):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["pip"] + ["agentrl"] * 5
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outputs = {}
    for cmd in commands[1:]:  # the pip install is what CI's setup did (scripts/test.sh)
        args = [str(REPO / a) if a.startswith("examples/") else a for a in cmd[1:]]
        args += SMALLER.get(args[0], [])
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "agentrl.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs[args[0]] = done.stdout
        print(f"{args[0]}: {time.perf_counter() - t0:.1f} s")
    assert "word-guess-v0" in outputs["envs"] and "agentrl-word-guess" in outputs["envs"]
    assert "word-guess-v0 passed" in outputs["check-env"]
    assert "held-out success" in outputs["train"]
    assert (tmp_path / "runs/word-guess/final/config.json").is_file()
    assert "success" in outputs["eval"]
