"""Fault runs: a real tiny model, real envs, tools, subprocesses, engine and chat template that fail.

Each case plays a real step (`collect`, the batch the trainer gets, and for the hung tool the
update itself) and checks that the step completes, that every failure is classified, that none of
the infrastructure failures is trained on (the `TrainBatch` rows are exactly the sound episodes'),
and that no child process is left behind.

`ProvisionEnv` provisions a "sandbox" at every reset through a real tool run by the real executor:
the tool starts a real subprocess (`sleep`) and waits for it, and the env kills what it started when
it is closed. Test knobs (class attributes) make the n-th reset's sandbox hang, or the provisioning
of chosen task seeds raise `InfrastructureFault`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from agentrl.config import load_config
from agentrl.driver.batch import score, to_batch
from agentrl.driver.collect import collect, task_seeds
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.trainer_side import TrainerSide
from agentrl.envs import Env, Message, register
from agentrl.envs.registration import ENVS
from agentrl.errors import InfrastructureFault, ToolErrorKind
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import ENGINES
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor

_spec = importlib.util.spec_from_file_location("agentrl_test_run_cli_hostile",
                                               Path(__file__).resolve().parents[1] / "run_cli_hostile.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # registers hostile-seeds-v0

HANG_S = 60  # a hung sandbox would run this long if nothing stopped it


class ProvisionEnv(Env):
    """One turn scored by the share of digits in the reply, after a sandbox is provisioned at reset."""

    splits = ("train", "test")
    resets = 0  # across instances: which reset is the n-th
    hang_nth = -1  # knobs, set by the tests
    fault_seeds: frozenset = frozenset()
    tool_attempts = 0

    def __init__(self, refuse_seeds=()):
        self.procs: list[subprocess.Popen] = []
        self.refuse_seeds = set(refuse_seeds)
        self.seed = None
        env = self

        @tool(policy=ToolPolicy(timeout_s=2 * HANG_S, retries=1))
        def provision(seconds: int, fault: bool) -> str:
            """Start a sandbox and wait until it is ready.

            Args:
                seconds: How long the sandbox takes to start.
                fault: Whether the sandbox pool is out of capacity.
            """
            ProvisionEnv.tool_attempts += 1
            if fault:
                raise InfrastructureFault("the sandbox pool has no capacity")
            proc = subprocess.Popen(["sleep", str(seconds)])
            env.procs.append(proc)
            proc.wait()
            return "ready"

        self.executor = ToolExecutor([provision])

    async def areset(self, *, seed=None, options=None):
        ProvisionEnv.resets += 1
        hang = ProvisionEnv.resets == ProvisionEnv.hang_nth
        call = ToolCall("provision", {"seconds": HANG_S if hang else 0, "fault": seed in ProvisionEnv.fault_seeds}, "c0")
        [result] = await self.executor.execute([call])
        if result.error_kind is ToolErrorKind.INFRASTRUCTURE:
            raise InfrastructureFault(result.content)
        return self.reset(seed=seed, options=options)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed = seed
        refuse = " REFUSE-ME" if seed in self.refuse_seeds else ""
        return (Message("user", f"Write digits after {seed}.{refuse}"),), {}

    def step(self, action):
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (), share, True, False, {}

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()


class HangingEngine(EmbeddedEngine):
    """The built-in engine, except that the requests numbered in `hang_on` (in arrival order) never return."""

    hang_on: frozenset = frozenset()
    calls = cancelled = 0

    async def generate(self, prompt_ids, sampling):
        n, HangingEngine.calls = HangingEngine.calls, HangingEngine.calls + 1
        if n in HangingEngine.hang_on:
            try:
                await self._never()
            except BaseException:
                HangingEngine.cancelled += 1
                raise
        return await super().generate(prompt_ids, sampling)

    @staticmethod
    async def _never() -> None:
        import asyncio

        await asyncio.Event().wait()


if "test-provision-v0" not in ENVS:
    register("test-provision-v0", ProvisionEnv)
if "test-hanging" not in ENGINES:
    ENGINES.register("test-hanging", HangingEngine)


@pytest.fixture(autouse=True)
def knobs():
    ProvisionEnv.resets, ProvisionEnv.hang_nth, ProvisionEnv.fault_seeds, ProvisionEnv.tool_attempts = 0, -1, frozenset(), 0
    HangingEngine.hang_on, HangingEngine.calls, HangingEngine.cancelled = frozenset(), 0, 0
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"child processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def _open(model_dir: str, tmp_path, *overrides: str) -> RolloutSide:
    cfg = load_config(None, [f"model.path={model_dir}", "env.id=test-provision-v0", "rollout.prompts_per_step=4",
                             "rollout.samples_per_prompt=4", "rollout.max_tokens_per_turn=8", "rollout.max_turns=1",
                             "rollout.max_total_tokens=64", "eval.num_tasks=0", f"run_dir={tmp_path}", *overrides])
    side = RolloutSide.open(cfg, splits=[(cfg.env.train_split, "env.train_split")])
    ProvisionEnv.resets = ProvisionEnv.tool_attempts = 0  # the checks before work reset the probe env too
    return side


def _close(side: RolloutSide) -> None:
    side.close()
    side.engine.sleep()  # joins the engine's thread (it must not outlive the test process)


def _assert_batch_is_the_sound_episodes(kept):
    batch = to_batch(kept)
    sound = [t for t in kept if t.failure is None]
    assert batch.trained_rows() == [i for i, t in enumerate(kept) if t.failure is None]
    assert int(batch.mask.sum()) == sum(t.num_model_tokens - t.loss_mask[0] for t in sound)  # next-token layout
    return batch


def test_a_tool_that_hangs_in_one_episode_of_64_does_not_hold_the_step(stopping_model_dir, tmp_path):
    side = _open(stopping_model_dir, tmp_path, "rollout.prompts_per_step=8", "rollout.samples_per_prompt=8",
                 "failures.episode_timeout_s=8")
    ProvisionEnv.hang_nth = 10  # the 10th episode's sandbox hangs for a minute
    try:
        t0 = time.perf_counter()
        kept, metrics = collect(side, 0)
        seconds = time.perf_counter() - t0
        # The hung episode's env was closed when it failed (not put back in the pool): its sandbox is gone now.
        assert not [p for p in psutil.Process().children(recursive=True) if p.name() == "sleep" and p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
        trainer = TrainerSide.open(side.cfg, side.path)
        batch, kl = score(_assert_batch_is_the_sound_episodes(kept), trainer, side.cfg.algorithm)
        update = trainer.update(batch, trainer.loss_settings(kl))
    finally:
        _close(side)
    assert 8 <= seconds < 8 + 40  # the deadline, the other episodes, a busy machine; not the minute
    assert metrics["failures/episode_deadline"] == metrics["episode_errors"] == 1 and metrics["failures/dropped"] == 1
    assert metrics["failures/retried"] == 0 and metrics["trained_episodes"] == len(kept) == 63
    assert metrics["error_samples"] == ["1x the episode did not finish within 8 s (failures.episode_timeout_s); it was "
                                        "waiting on the env's reset"]
    assert all(t.failure is None for t in kept)
    assert update["skipped"] == 0.0 and update["loss"] == update["loss"]  # an optimizer step on a finite loss


def test_a_hung_engine_request_is_retried_and_the_replay_is_what_a_first_try_gives(stopping_model_dir, tmp_path):
    side = _open(stopping_model_dir, tmp_path, "rollout.engine=test-hanging", "failures.request_timeout_s=3")
    try:
        clean, _ = collect(side, 0)
        HangingEngine.hang_on, HangingEngine.calls = frozenset({2, 9}), 0
        kept, metrics = collect(side, 0)
    finally:
        _close(side)
    assert metrics["failures/engine_timeout"] == 2 and HangingEngine.cancelled == 2
    assert metrics["failures/retried"] == 2 and metrics["failures/dropped"] == 0 and metrics["trained_episodes"] == 16
    assert metrics["error_samples"][0].startswith("2x the engine did not answer a request of ")
    # Replayed alone, with the seeds of their spec, the two episodes sampled what they did in the clean run.
    assert [t.token_ids for t in kept] == [t.token_ids for t in clean]


@pytest.mark.parametrize("after_retries", ["drop", "keep_zero_loss"])
def test_a_fault_that_outlives_every_retry_is_never_trained_on(stopping_model_dir, tmp_path, after_retries):
    side = _open(stopping_model_dir, tmp_path, f"failures.after_retries={after_retries}")
    faulty = task_seeds(0, 4, 0)[1]  # the second task of step 1 (train.seed 0)
    ProvisionEnv.fault_seeds = frozenset({faulty})
    try:
        kept, metrics = collect(side, 0)
    finally:
        _close(side)
    # 12 sound episodes, one attempt each; 4 faulty ones x 3 tries (failures.max_retries=2) x 2 tool attempts
    # (ToolPolicy.retries=1)
    assert ProvisionEnv.tool_attempts == 12 + 4 * 3 * 2
    assert metrics["failures/tool_infrastructure"] == 12 and metrics["failures/retried"] == 8
    assert metrics["error_samples"] == ["12x InfrastructureFault: Error (infrastructure): 'provision' is unavailable: "
                                        "InfrastructureFault: the sandbox pool has no capacity"]
    failed = [t for t in kept if t.failure]
    if after_retries == "drop":
        assert metrics["failures/dropped"] == 4 and not failed and len(kept) == 12
    else:
        assert metrics["failures/kept_zero_loss"] == 4 and len(failed) == 4 and len(kept) == 16
        assert {t.seed for t in failed} == {faulty}
    assert metrics["trained_episodes"] == 12 and all(t.seed != faulty for t in kept if t.failure is None)
    batch = _assert_batch_is_the_sound_episodes(kept)
    assert batch.num_rows == len(kept)


def test_an_env_that_raises_on_some_seeds_is_retried_then_dropped(stopping_model_dir, tmp_path):
    bad = task_seeds(0, 4, 0)[2]
    side = _open(stopping_model_dir, tmp_path, "env.id=hostile-seeds-v0", f"env.kwargs.fail_seeds=[{bad}]",
                 "failures.policy.env_error=retry")
    try:
        kept, metrics = collect(side, 0)
    finally:
        _close(side)
    assert metrics["failures/env_error"] == 12 and metrics["failures/retried"] == 8 and metrics["failures/dropped"] == 4
    assert metrics["error_samples"] == [f"12x ConnectionError: task server dropped the request for task {bad}"]
    assert len(kept) == metrics["trained_episodes"] == 12 and bad not in {t.seed for t in kept}
    _assert_batch_is_the_sound_episodes(kept)


def test_a_template_that_refuses_one_conversation_drops_that_group(stopping_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "refusing-model"
    shutil.copytree(stopping_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{%- for m in messages %}{%- if 'REFUSE-ME' in m['content'] %}{{ raise_exception("
                         "'this template refuses the word REFUSE-ME') }}{%- endif %}{%- endfor %}" + tok.chat_template)
    tok.save_pretrained(model)
    refused = task_seeds(0, 4, 0)[3]
    side = _open(str(model), tmp_path / "run", f"env.kwargs.refuse_seeds=[{refused}]")
    try:
        kept, metrics = collect(side, 0)
    finally:
        _close(side)
    assert metrics["failures/template_refused"] == 4 and metrics["failures/dropped_groups"] == 1
    assert metrics["error_samples"] == ["4x ChatTemplateError: the chat template rejects the episode's opening (roles: "
                                        "user): TemplateError: this template refuses the word REFUSE-ME. Run `agentrl "
                                        "check-model MODEL --env ENV` to see every conversation shape the env produces; "
                                        "use a template that accepts them, or change what the env sends"]
    assert len(kept) == metrics["trained_episodes"] == 12 and refused not in {t.seed for t in kept}
    _assert_batch_is_the_sound_episodes(kept)
