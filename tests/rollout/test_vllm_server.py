"""The vllm backend's server mode against `vllm_protocol_server.py` over real HTTP on 127.0.0.1.

A protocol test, not vLLM: the stand-in speaks vLLM 0.24's server protocol with agentrl's embedded
engine behind it (see its docstring). The conformance suite runs on it too (`vllm-protocol` in
test_conformance.py); these are the server-only paths: sleep and wake with weights that arrive
asleep, a crashed server restarted with the current weights re-synced, a server without vLLM's
development endpoints, the server's own error text, and loading a model directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm_protocol_server import protocol_engine

from agentrl.errors import EngineError
from agentrl.rollout.backends.managed import ManagedServer, ServerSpec
from agentrl.rollout.backends.vllm import VLLMEngine
from agentrl.rollout.engine import SamplingParams
from tests.hf_reference import assert_greedy_matches

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_protocol_server.py")
PROMPT = list(range(10, 45))
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def greedy(engine, prompt=PROMPT):
    return asyncio.run(engine.generate(prompt, GREEDY))


@pytest.fixture(scope="module")
def new_model(tiny_model_dir):
    """The tiny model with its weights moved far enough that greedy outputs change."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    return model


def test_weights_pushed_while_asleep_serve_after_wake(tiny_model_dir, new_model):
    engine = protocol_engine(tiny_model_dir)
    try:
        before = greedy(engine)
        engine.sleep()
        with pytest.raises(EngineError, match="asleep"):
            greedy(engine)
        engine.update_weights(new_model.state_dict(), version=3)
        assert engine.weight_version == 0  # kept for wake(): nothing to load into while asleep
        engine.wake()
        after = greedy(engine)
        assert after.weight_version == 3 and after.token_ids != before.token_ids
        assert_greedy_matches(new_model, PROMPT, after.token_ids, after.logprobs, 1e-4, 1e-5)
    finally:
        engine.close()


def test_crashed_server_restarts_with_current_weights(tiny_model_dir, new_model):
    engine = protocol_engine(tiny_model_dir)
    try:
        engine.update_weights(new_model.state_dict(), version=5)
        expected = greedy(engine)
        server = engine.transport.server
        os.killpg(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        out = greedy(engine)  # connection refused -> restart -> weights re-synced -> retried once
        assert server.restarts == 1
        assert out.token_ids == expected.token_ids and out.weight_version == 5
    finally:
        engine.close()
    assert engine.transport.server.pid is None  # close() stopped the launched server


@pytest.fixture()
def plain_server(tiny_model_dir):
    """The stand-in started without VLLM_SERVER_DEV_MODE and with a short context, as a user's URL."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    command = lambda port: [sys.executable, SERVER, "--model", tiny_model_dir, "--port", str(port),  # noqa: E731
                            "--max-model-len", "64", "--skip-tokenizer-init", "--enable-prompt-tokens-details"]
    server = ManagedServer("plain-vllm", command, ServerSpec(launch=True, startup_timeout_s=180, env=env))
    with server:
        yield server.url


def test_abort_before_the_reader_starts_still_ends_the_request(tiny_model_dir):
    """An abort that cancels a request's HTTP reader before the reader's first step (its handler never
    runs) still ends the response with `abort`, and an abort after the last chunk keeps the response."""
    engine = protocol_engine(tiny_model_dir)
    transport = engine.transport

    async def race():
        stream = transport.stream("r1", PROMPT, SamplingParams(max_tokens=500))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # `first` ran up to its queue wait; the reader task is created, not started
        assert not transport._readers["r1"][0].done()
        await transport.abort(["r1"])
        delta = await asyncio.wait_for(first, 10)
        await stream.aclose()
        return delta

    try:
        delta = engine._loop.run(race(), timeout=30)
        assert delta.finish_reason == "abort" and delta.token_ids == ()
        done = greedy(engine)  # the server serves on; a late abort of a finished request changes nothing
        assert done.finish_reason == "length" and len(done.token_ids) == GREEDY.max_tokens
    finally:
        engine.close()


def test_server_without_dev_endpoints(tiny_model_dir, new_model, plain_server):
    engine = VLLMEngine(tiny_model_dir, device="cpu", dtype=torch.float32, server=ServerSpec(url=plain_server))
    try:
        assert len(greedy(engine).token_ids) == 10  # generation needs no development endpoint
        with pytest.raises(EngineError, match="VLLM_SERVER_DEV_MODE=1"):
            engine.update_weights(new_model.state_dict(), version=1)
        with pytest.raises(EngineError, match="VLLM_SERVER_DEV_MODE=1"):
            engine.sleep()
        # The server's own refusal comes through with its text (its max_model_len is 64, ours 4096).
        with pytest.raises(EngineError, match="maximum context length is 64"):
            asyncio.run(engine.generate(list(range(3, 80)), GREEDY))
    finally:
        engine.close()
    with ManagedServer("probe", lambda p: [], ServerSpec(url=plain_server)) as still_there:  # close() left it running
        assert still_there.url == plain_server


def test_update_from_a_model_directory(tiny_model_dir, new_model, tmp_path):
    new_model.save_pretrained(tmp_path / "new")
    engine = protocol_engine(tiny_model_dir)
    try:
        engine.update_weights_from_disk(str(tmp_path / "new"), version=9)
        out = greedy(engine)
        assert out.weight_version == 9 and out.prompt_cached_tokens == 0
        assert_greedy_matches(new_model, PROMPT, out.token_ids, out.logprobs, 1e-4, 1e-5)
        with pytest.raises(EngineError, match="save_pretrained"):
            engine.update_weights_from_disk(str(tmp_path), version=10)
        assert engine.weight_version == 9 and os.path.isdir(tmp_path / "new")  # a user's directory is never removed
    finally:
        engine.close()


def test_colocated_training_runs_through_the_http_client(stopping_model_dir, tmp_path):
    """Two colocated training steps (one process) with the vllm backend launching the stand-in server: episodes
    are played over HTTP, the engine sleeps for each update, and after each step it samples with the trainer's
    new weights (its logprobs equal a recomputation with them); the server is stopped at the end. The backend is
    registered under a second name: `resolve_engine` asks for the vllm package for `rollout.engine: vllm`,
    which a server needs none of."""
    from agentrl.config import load_config
    from agentrl.driver.loop import train_step
    from agentrl.driver.sides import open_sides
    from agentrl.driver.timing import StepClock
    from agentrl.envs.registration import ENVS
    from agentrl.rollout.agent_loop import EpisodeSpec
    from agentrl.rollout.engine import ENGINES

    if "vllm-http-test" not in ENGINES:
        ENGINES.register("vllm-http-test", "agentrl.rollout.backends.vllm:VLLMEngine")
    if "ray-digits-v0" not in ENVS:
        ENVS.register("ray-digits-v0", "tests.driver.ray_parts:DigitsEnv")
    cfg = load_config(None, [
        f"model.path={stopping_model_dir}", "env.id=ray-digits-v0", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=3", "rollout.max_tokens_per_turn=16", "rollout.max_turns=1",
        "rollout.max_total_tokens=64", "optim.lr=0.01", "train.steps=2", "train.checkpoint_every=0",
        "eval.num_tasks=0", f"run_dir={tmp_path}", "cluster.colocate=true", "rollout.engine=vllm-http-test",
        "rollout.server.launch=true", "rollout.server.startup_timeout_s=180",
        f'rollout.engine_options.launcher=["{sys.executable}", "{SERVER}"]'])
    policy = AutoModelForCausalLM.from_pretrained(stopping_model_dir, dtype=torch.float32).eval()
    with open_sides(cfg, [("train", "env.train_split")]) as (rollout, trainer):
        engine = rollout.engine.engine
        assert isinstance(engine, VLLMEngine)
        for step in range(2):
            clock = StepClock()
            metrics = train_step(rollout, trainer, step, clock)
            assert metrics["trained_episodes"] == 6 and metrics["episode_errors"] == 0
            assert "time/rollout/sleep" in clock.metrics() and engine.weight_version == step + 1
            policy.load_state_dict(trainer.weights())
            for traj in rollout.play([EpisodeSpec(seed=i) for i in range(3)], temperature=1.0, seed=step):
                ids = torch.tensor([traj.token_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(policy(ids).logits[0, :-1].float(), -1)  # [T-1, V]
                ref = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
                mask = torch.tensor(traj.loss_mask[1:]).bool()
                got = torch.tensor(traj.rollout_logprobs[1:])
                assert mask.any() and (got - ref)[mask].abs().max() < 1e-4
                assert set(traj.weight_versions[i + 1] for i in range(len(mask)) if mask[i]) == {step + 1}
        pid = engine.transport.server.pid
    assert "vllm protocol server (a test stand-in, not vLLM)" in (tmp_path / "servers" / "vllm.log").read_text()
    assert pid is not None and not _processes_with(SERVER, stopping_model_dir)  # the launched server was stopped


def _processes_with(*words: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if all(w in cmd for w in words):
                pids.append(int(entry))
    return pids
