"""SIGTERM and Ctrl-C stop `agentrl train` cleanly: the last whole step checkpointed, a clear line, the
signal's exit code, every process it started gone (counted), and `--resume` continues the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agentrl.driver.signals import StopSignals
from agentrl.errors import RunInterrupted
from agentrl.trainer.checkpoint import checkpoint_step, latest_checkpoint

SCRIPT = Path(__file__).with_name("run_train.py")


def test_a_signal_waits_for_the_step_and_a_second_one_does_not():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's own once a test started Ray here
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # outside a stretch that may stop at once: only noted
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(RunInterrupted, match="stopped by SIGTERM") as first:
            stop.check()
        assert not first.value.forced
        with pytest.raises(RunInterrupted, match="second SIGINT") as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert second.value.forced
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_signal_while_playing_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop, pytest.raises(RunInterrupted, match="stopped by SIGINT"), stop.interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # not reached: the handler raises
    assert signal.getsignal(signal.SIGINT) is before


def _ours(tag: str) -> list[int]:
    """Processes started for the run: the driver, Ray's GCS, raylet and agents, the workers (all inherit
    RAY_TMPDIR=tag in their environment, or name it on their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:
                continue
            if tag.encode() in text:
                found.append(int(entry.name))
    return found


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _stop_mid_run(cmd: list[str], env: dict, run_dir: Path, sig: int, tag: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start the run, send `sig` once its first step is written, wait for it to end; (result, processes
    of the run just before the signal)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any("step" in r for r in _records(run_dir)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    running = len(_ours(tag))
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(cmd, proc.returncode, out), running


def _config(tmp_path: Path, model_dir: str, cluster: str, schedule: str) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{path: {model_dir}}}
env: {{id: calculator-v0}}
rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_tokens_per_turn: 16, max_turns: 1, max_total_tokens: 256}}
algorithm: {{entropy_coef: 0.01}}
train: {{steps: 200, checkpoint_every: 0, micro_batch_tokens: 256, schedule: {schedule}}}
eval: {{num_tasks: 0}}
cluster: {cluster}
""")
    return cfg


@pytest.mark.parametrize("mode, sig, schedule", [("ray", signal.SIGTERM, "synchronous"),
                                                ("ray", signal.SIGTERM, "asynchronous"),
                                                ("local", signal.SIGINT, "synchronous")])
def test_a_stopped_run_checkpoints_leaves_no_process_and_resumes(stopping_model_dir, tmp_path, mode, sig, schedule):
    """(Asynchronous: the signal lands while the producer plays a later step on the workers; it is
    stopped and joined before the checkpoint.)"""
    cluster = "{mode: ray, rollout_workers: 2, num_cpus: 3}" if mode == "ray" else "{mode: local}"
    cfg, run_dir = _config(tmp_path, stopping_model_dir, cluster, schedule), tmp_path / "run"
    tag = tempfile.mkdtemp(prefix="ar", dir="/tmp")  # Ray's root; short, as Ray's socket paths must stay short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": tag}
    cmd = [sys.executable, str(SCRIPT), "train", str(cfg), f"run_dir={run_dir}"]
    try:
        assert _ours(tag) == []
        done, running = _stop_mid_run(cmd, env, run_dir, sig, tag)
        assert running >= (5 if mode == "ray" else 1)  # the driver (and GCS, raylet, two rollout workers, ...)
        name = signal.Signals(sig).name
        assert done.returncode == 128 + sig, done.stdout[-3000:]
        assert f"stopped: stopped by {name} after step" in done.stdout and "continue with --resume" in done.stdout
        stop = _records(run_dir)[-2]  # then the error record that ends a failed run's metrics
        assert stop["event"] == "interrupted" and stop["signal"] == sig and stop["step"] >= 1
        assert stop["checkpoint_step"] == stop["step"] == checkpoint_step(latest_checkpoint(run_dir))
        deadline = time.monotonic() + 10
        while _ours(tag) and time.monotonic() < deadline:  # no orphans; a moment to be reaped
            time.sleep(0.2)
        assert _ours(tag) == []
        resumed = subprocess.run(cmd + ["--resume", f"train.steps={stop['step'] + 1}"], env=env, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        after = _records(run_dir)
        assert [r["from_step"] for r in after if r.get("event") == "resume"] == [stop["step"]]
        assert after[-1].get("step") == stop["step"] + 1
        assert _ours(tag) == []
    finally:
        shutil.rmtree(tag, ignore_errors=True)
