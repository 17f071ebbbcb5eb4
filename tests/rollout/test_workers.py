"""The rollout worker in this process (no Ray): seeds by batch place, health answered mid-generation from
another thread, abort, sleep/wake, and refusing to play with weights it does not hold."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams
from agentrl.rollout.workers import RolloutWorker, StaleWeightsError, WorkerSetup

SPECS = [EpisodeSpec(seed=10 + g, group_id=g, index=i) for i, g in enumerate([0, 0, 1, 1])]


@pytest.fixture(scope="module")
def worker(stopping_model_dir) -> RolloutWorker:
    setup = WorkerSetup(engine=EmbeddedEngine, model_path=stopping_model_dir, device="cpu", dtype=torch.float32,
                        max_model_len=2048, env_id="calculator-v0", limits=EpisodeLimits(2, 2000))
    w = RolloutWorker(setup)
    yield w
    w.close()


def test_episodes_are_seeded_by_their_place_in_the_batch(worker):
    sampling = SamplingParams(temperature=1.0, max_tokens=24, seed=5)
    played_before = worker.health().episodes_played
    first, _ = worker.play(SPECS, sampling, version=0)
    again, use = worker.play(SPECS, sampling, version=0)
    shifted, _ = worker.play([replace(s, index=s.index + 4) for s in SPECS], sampling, version=0)
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    assert [t.token_ids for t in first] != [t.token_ids for t in shifted]  # other places, other seeds
    assert use.generated_tokens == sum(t.num_model_tokens for t in again) and use.busy_s > 0
    assert worker.health().episodes_played == played_before + 3 * len(SPECS)


def _play_in_thread(worker, max_tokens: int) -> tuple[threading.Thread, list]:
    out: list = []
    sampling = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=1)
    specs = [replace(s, index=i) for i, s in enumerate(SPECS * 4)]
    thread = threading.Thread(target=lambda: out.append(worker.play(specs, sampling, 0)))
    thread.start()
    return thread, out


def _wait_in_flight(worker) -> object:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = worker.health()
        if health.in_flight:
            return health
        time.sleep(0.005)
    raise AssertionError("the engine never had a request in flight")


def test_health_answers_mid_generation_and_abort_ends_the_episodes(worker):
    thread, out = _play_in_thread(worker, max_tokens=1500)
    health = _wait_in_flight(worker)
    t0 = time.perf_counter()
    worker.health()
    assert time.perf_counter() - t0 < 0.1  # counters only: no wait on the engine
    assert health.in_flight > 0 and health.stalled_s < 5 and health.version == 0 and not health.asleep
    worker.abort()
    thread.join(timeout=60)
    trajectories, _ = out[0]
    assert any(t.truncation == "abort" for t in trajectories)
    assert worker.health().in_flight == 0 and worker.health().stalled_s == 0.0


def _sampled_versions(trajectory) -> list[int]:
    return [v for v, m in zip(trajectory.weight_versions, trajectory.loss_mask) if m]


def test_weights_pushed_from_another_thread_reach_the_episodes_in_flight(worker):
    """On Ray, `update_weights` runs on a thread of its own (the `weights` concurrency group), so a push
    lands while a slice plays: the engine swaps the weights between two steps, the episodes go on,
    and every token keeps the version that sampled it."""
    held = worker.health().version
    tokens = worker.health().generated_tokens
    thread, out = _play_in_thread(worker, max_tokens=1500)  # sent expecting version 0: it holds `held` >= 0
    deadline = time.monotonic() + 60
    while worker.health().generated_tokens < tokens + 64 and time.monotonic() < deadline:
        time.sleep(0.005)
    same = {k: v.clone() for k, v in worker.engine.engine.engine.model.state_dict().items()}
    worker.update_weights(same, held + 1)  # from this thread, while the play's thread plays
    assert thread.is_alive() and worker.health().version == held + 1
    pushed_at = worker.health().generated_tokens
    while worker.health().generated_tokens < pushed_at + 64 and time.monotonic() < deadline:
        time.sleep(0.005)
    worker.abort()
    thread.join(timeout=60)
    trajectories, _ = out[0]
    versions = [_sampled_versions(t) for t in trajectories]
    assert {v for vs in versions for v in vs} == {held, held + 1}
    assert all(vs == sorted(vs) for vs in versions)  # an episode's tokens: the old version, then the new one
    turns = [set(t.weight_versions[a:b]) for t in trajectories for a, b in t.turn_spans]
    assert {held, held + 1} in turns  # some turn went on across the swap, each token with its own version
    # A push that arrives after a newer one is skipped; a play may find newer weights than it was sent for.
    worker.update_weights(same, held)
    assert worker.health().version == held + 1
    again, _ = worker.play(SPECS, SamplingParams(max_tokens=8, seed=1), version=held)
    assert {v for t in again for v in _sampled_versions(t)} == {held + 1}


def test_asleep_it_refuses_requests_and_awake_it_plays(worker):
    sampling = SamplingParams(temperature=1.0, max_tokens=16, seed=2)
    assert worker.sleep() >= 0 and worker.health().asleep
    refused, _ = worker.play(SPECS, sampling, version=0)
    assert all(t.error is not None and "asleep" in t.error for t in refused)  # data, not a crash
    worker.wake()
    played, _ = worker.play(SPECS, sampling, version=0)
    assert all(t.error is None for t in played) and not worker.health().asleep


def test_it_refuses_to_play_with_weights_it_does_not_hold(worker):
    played_before, held = worker.health().episodes_played, worker.health().version
    with pytest.raises(StaleWeightsError, match=f"holds weights version {held}, the driver expects {held + 3} or new"):
        worker.play(SPECS, SamplingParams(), version=held + 3)
    assert worker.health().episodes_played == played_before  # refused: nothing played
    state = {k: v.clone() for k, v in worker.engine.engine.engine.model.state_dict().items()}
    worker.update_weights(state, held + 3)
    assert worker.health().version == held + 3
    trajectories, _ = worker.play(SPECS, SamplingParams(max_tokens=8, seed=1), version=held + 3)
    assert {v for t in trajectories for v in t.weight_versions} == {-1, held + 3}
