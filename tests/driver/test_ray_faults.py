"""Fault runs on Ray rollout workers: the faults of `test_failures_faults.py` inside the workers.

Each case opens a run's two sides with `cluster.mode=ray` (a private Ray started for the run, two
rollout workers, the trainer in this process), plays a real step on the real tiny model, updates
and pushes the weights back to the workers, and checks that the step completes on time, that every
failure has its class and its text, that the `TrainBatch`'s trained rows are exactly the sound
episodes (no infrastructure failure is trained on), and that once the sides are closed no process
is left: not Ray's, not a worker, not what a worker's env started (counted with psutil: every
process that inherited this test's tag in its environment, reparented or not).

The env (`tests.driver.ray_parts:SandboxEnv`) provisions a sandbox at every reset through a real
tool that starts a real `sleep` subprocess; its faults travel as env kwargs, since the workers are
other processes.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import psutil

from agentrl.config import load_config
from agentrl.driver.batch import score, to_batch
from agentrl.driver.collect import collect, task_seeds
from agentrl.driver.sides import open_sides
from agentrl.driver.weight_sync import push_weights
from agentrl.envs.registration import ENVS
from tests.driver.ray_processes import ours, tag  # noqa: F401 (`tag` is a fixture)

if "ray-sandbox-v0" not in ENVS:  # the workers get the entry from the driver and import the class by name
    ENVS.register("ray-sandbox-v0", "tests.driver.ray_parts:SandboxEnv")

def _cfg(model_dir: str, run_dir: Path, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}", "env.id=ray-sandbox-v0", "cluster.mode=ray", "cluster.rollout_workers=2",
        "cluster.num_cpus=3", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "rollout.max_tokens_per_turn=8", "rollout.max_turns=1", "rollout.max_total_tokens=64", "eval.num_tasks=0",
        f"run_dir={run_dir}", *extra])


def _step_on_the_sound_episodes(rollout, trainer, kept) -> dict:
    """Check that the batch trains exactly the sound episodes; update on it and push the weights to the workers."""
    batch = to_batch(kept)
    sound = [t for t in kept if t.failure is None]
    assert batch.trained_rows() == [i for i, t in enumerate(kept) if t.failure is None]
    assert int(batch.mask.sum()) == sum(t.num_model_tokens - t.loss_mask[0] for t in sound)  # next-token layout
    batch, kl = score(batch, trainer, rollout.cfg.algorithm)
    update = trainer.update(batch, trainer.loss_settings(kl))
    assert update["skipped"] == 0.0 and update["loss"] == update["loss"]  # an optimizer step on a finite loss
    push_weights(trainer, rollout, version=1)
    assert [h.version for h in rollout.health()] == [1, 1]
    return update


def _watch_sandboxes(tag: str, seen: set[int], done: threading.Event) -> threading.Thread:
    """A thread that notes the pid of every hung sandbox (`sleep 60`) among the test's processes until `done`."""
    def watch():
        while not done.is_set():
            for proc in ours(tag):
                try:
                    if proc.cmdline()[:2] == ["sleep", "60"]:
                        seen.add(proc.pid)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_tool_that_hangs_in_one_episode_of_64_on_a_ray_worker_does_not_hold_the_step(stopping_model_dir,
                                                                                       tmp_path, tag):
    hang = tmp_path / "hang"
    cfg = _cfg(stopping_model_dir, tmp_path / "run", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=8",
               "failures.episode_timeout_s=8", f"env.kwargs.hang_file={hang}")
    with open_sides(cfg, [(cfg.env.train_split, "env.train_split")]) as (rollout, trainer):
        hang.write_text("")  # armed once the driver's checks have reset the env on a few tasks
        sandboxes, done = set(), threading.Event()
        watcher = _watch_sandboxes(tag, sandboxes, done)
        t0 = time.perf_counter()
        kept, metrics = collect(rollout, 0)
        seconds = time.perf_counter() - t0
        done.set()
        watcher.join()
        running = ours(tag)
        workers = {h.pid for h in rollout.health()}
        # One sandbox, in a worker, claimed the hang; it ended with its env when the episode failed.
        [claimed] = tmp_path.glob("hang-*")
        assert int(claimed.name.split("-")[1]) in workers and os.getpid() not in workers
        assert len(sandboxes) == 1 and not sandboxes & {p.pid for p in running}  # seen running, gone now
        assert workers <= {p.pid for p in running}  # the count sees the workers too
        assert rollout.worker_metrics() == {}  # a hung tool is the episode's failure, not its worker's
        _step_on_the_sound_episodes(rollout, trainer, kept)
    assert len(running) >= 4  # GCS, raylet, the two workers (and Ray's agents): the count sees them
    assert 8 <= seconds < 8 + 40  # the deadline, the other episodes, a busy machine; not the minute
    assert metrics["failures/episode_deadline"] == metrics["episode_errors"] == 1 and metrics["failures/dropped"] == 1
    assert metrics["failures/retried"] == 0 and metrics["trained_episodes"] == len(kept) == 63
    assert metrics["error_samples"] == ["1x the episode did not finish within 8 s (failures.episode_timeout_s); it was "
                                        "waiting on the env's reset"]
    assert all(t.failure is None for t in kept)


def test_a_template_that_refuses_one_conversation_on_a_ray_worker_drops_that_group(stopping_model_dir, tmp_path,
                                                                                   tag):
    from transformers import AutoTokenizer

    model = tmp_path / "refusing-model"
    shutil.copytree(stopping_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{%- for m in messages %}{%- if 'REFUSE-ME' in m['content'] %}{{ raise_exception("
                         "'this template refuses the word REFUSE-ME') }}{%- endif %}{%- endfor %}" + tok.chat_template)
    tok.save_pretrained(model)
    refused = task_seeds(0, 4, 0)[3]
    cfg = _cfg(str(model), tmp_path / "run", f"env.kwargs.refuse_seeds=[{refused}]")
    with open_sides(cfg, [(cfg.env.train_split, "env.train_split")]) as (rollout, trainer):
        kept, metrics = collect(rollout, 0)
        assert rollout.worker_metrics() == {}
        _step_on_the_sound_episodes(rollout, trainer, kept)
    assert metrics["failures/template_refused"] == metrics["episode_errors"] == 4
    assert metrics["failures/dropped_groups"] == 1 and metrics["failures/retried"] == 0
    assert metrics["error_samples"] == ["4x ChatTemplateError: the chat template rejects the episode's opening (roles: "
                                        "user): TemplateError: this template refuses the word REFUSE-ME. Run `agentrl "
                                        "check-model MODEL --env ENV` to see every conversation shape the env produces; "
                                        "use a template that accepts them, or change what the env sends"]
    assert len(kept) == metrics["trained_episodes"] == 12 and refused not in {t.seed for t in kept}
    assert all(t.failure is None for t in kept)
