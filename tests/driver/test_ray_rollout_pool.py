"""The Ray rollout side on a real Ray (CPU): slices of whole groups handed to workers as they free up
(a slow worker plays fewer, and the results do not depend on who played what), results in order and
equal to one engine's, weights put into Ray's object store once per push, weights pushed while a
play runs (the asynchronous schedule), and faults survived: a worker SIGKILLed mid-step, an engine
that stops answering, a worker lost for good. One Ray session serves the whole module (starting Ray
costs seconds)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ray import get as ray_get

from agentrl.config import load_config
from agentrl.driver.cluster import RaySession
from agentrl.driver.rollout_pool import RayRolloutSide
from agentrl.driver.rollout_round import PlayAborted, call, split_by_groups
from agentrl.driver.rollout_side import RolloutSide
from agentrl.rollout.agent_loop import EpisodeSpec
from agentrl.rollout.engine import ENGINES

if "test-stalling" not in ENGINES:  # a real registry entry; Ray workers import the module by this name
    ENGINES.register("test-stalling", "tests.driver.ray_parts:StallingEngine")
if "test-slow" not in ENGINES:
    ENGINES.register("test-slow", "tests.driver.ray_parts:SlowEngine")
if "test-server-shaped" not in ENGINES:
    ENGINES.register("test-server-shaped", "tests.driver.ray_parts:ServerShapedEngine")

SPECS = [EpisodeSpec(seed=100 + g, split="train", group_id=g) for g in range(3) for _ in range(2)]


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_session(fault_dir):
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AGENTRL_FAULT_DIR": str(fault_dir), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _cfg(model_dir: str, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}", "env.id=calculator-v0", "cluster.mode=ray", "cluster.rollout_workers=2",
        "rollout.max_tokens_per_turn=24", "rollout.max_turns=2", "rollout.max_total_tokens=256", *extra])


@contextlib.contextmanager
def _opened(cfg) -> Iterator[RayRolloutSide]:
    """The Ray rollout side on the module's Ray; its workers and placement group are given back after."""
    session = RaySession.open(cfg.cluster)
    try:
        side = RayRolloutSide.open(cfg, session.place(cfg.cluster).rollout, [("train", "env.train_split")])
        try:
            yield side
        finally:
            side.close()
    finally:
        session.close()


def _same(a, b) -> bool:
    return all(x.token_ids == y.token_ids and x.rollout_logprobs == y.rollout_logprobs and x.reward == y.reward
               for x, y in zip(a, b, strict=True))


def _perturbed(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v * 1.01 for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def test_slices_hold_whole_groups_in_order():
    specs = [EpisodeSpec(seed=s, group_id=g) for g, s in [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (7, 4)]]
    assert split_by_groups(specs, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert split_by_groups(specs, 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert split_by_groups(specs, 9) == [[0, 1], [2, 3], [4, 5], [6]]  # fewer groups than workers
    assert split_by_groups(specs[:2] + specs[4:6] + specs[2:4], 3) == [[0, 1], [2, 3], [4, 5]]  # by id, not position


def test_two_workers_play_in_order_like_one_engine(ray_session, stopping_model_dir):
    cfg = _cfg(stopping_model_dir)
    local = RolloutSide.open(cfg)
    try:
        with _opened(cfg) as side:
            health = side.health()
            assert len({h.pid for h in health}) == 2 and os.getpid() not in {h.pid for h in health}
            got = side.play(SPECS, 1.0, seed=7)
            assert _same(got, side.play(SPECS, 1.0, seed=7))  # a function of the specs and the seed
            ref = local.play(SPECS, 1.0, seed=7)
            assert [(t.seed, t.group_id) for t in got] == [(s.seed, s.group_id) for s in SPECS]
            # One engine batching all six episodes samples the same tokens; the logprobs agree to float
            # rounding only (another batch shape), so equality is checked on tokens, closeness on logprobs.
            assert [t.token_ids for t in got] == [t.token_ids for t in ref]
            assert sum(t.num_model_tokens for t in got) > 20
            for a, b in zip(got, ref):
                torch.testing.assert_close(torch.tensor(a.rollout_logprobs), torch.tensor(b.rollout_logprobs),
                                           atol=1e-4, rtol=0)
            weights = _perturbed(stopping_model_dir)
            side.update_weights(weights, 1)
            assert {h.version for h in side.health()} == {1}
            assert {v for t in side.play(SPECS, 1.0, seed=7) for v in t.weight_versions} == {-1, 1}
    finally:
        local.close()


def test_a_slow_worker_plays_fewer_groups_and_who_played_what_changes_nothing(ray_session, stopping_model_dir,
                                                                             fault_dir):
    cfg = _cfg(stopping_model_dir, "rollout.engine=test-slow", "cluster.calls_per_worker=4")
    specs = [EpisodeSpec(seed=200 + g, split="train", group_id=g) for g in range(8) for _ in range(2)]
    slow = fault_dir / "slow"
    plays, played = [], []
    with _opened(cfg) as side:
        pids = [h.pid for h in side.health()]
        for slow_one in (0, 1):  # worker 0 is the slow one, then worker 1
            slow.write_text(str(pids[slow_one]))
            before = [h.episodes_played for h in side.health()]
            plays.append(side.play(specs, 1.0, seed=7))
            played.append([h.episodes_played - b for h, b in zip(side.health(), before)])
    slow.unlink()
    # 2 workers x 4 calls: 8 slices of one group each. A slice costs the slow worker a second per turn
    # more than the other, so the other one takes most of them as it frees up.
    for slow_one, counts in enumerate(played):
        assert sum(counts) == len(specs) and counts[slow_one] < counts[1 - slow_one], played
    # Mostly worker 1 played the first batch, mostly worker 0 the second: the trajectories are the same
    # (each episode's seed is its place in the batch, and a slice's batches do not depend on the worker).
    assert _same(plays[0], plays[1])


def _spy_on_weights(monkeypatch) -> tuple[list, list]:
    """(every ObjectRef `ray.put` returned, the weights argument of every `update_weights` call sent to
    a worker), recorded as the pool makes the real calls."""
    import ray

    from agentrl.driver import rollout_pool, rollout_round

    puts, sent = [], []
    real_put, real_call = ray.put, rollout_round.call

    def put(value, **kwargs):
        puts.append(real_put(value, **kwargs))
        return puts[-1]

    def call(actor, method, *args, **kwargs):
        if method == "update_weights":
            sent.append(args[0])
        return real_call(actor, method, *args, **kwargs)

    monkeypatch.setattr(ray, "put", put)
    for module in (rollout_pool, rollout_round):
        monkeypatch.setattr(module, "call", call)
    return puts, sent


def _stall_then(fault_dir: Path, action) -> threading.Thread:
    """Arm the stalling engine (a worker claims it when it starts, so call this before opening the side);
    once that worker stalls on its first request, run `action(pid)` in a thread."""
    for name in ("claimed", "stalled"):
        (fault_dir / name).unlink(missing_ok=True)
    (fault_dir / "arm").write_text("")

    def watch():
        deadline = time.monotonic() + 120
        while not (fault_dir / "stalled").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        action(int((fault_dir / "claimed").read_text()))

    return threading.Thread(target=watch, daemon=True)


def test_sigkilled_worker_restarts_and_its_episodes_are_played_again(ray_session, stopping_model_dir, fault_dir,
                                                                     monkeypatch):
    cfg = _cfg(stopping_model_dir, "rollout.engine=test-stalling", "cluster.health_timeout_s=600")
    killer = _stall_then(fault_dir, lambda pid: os.kill(pid, signal.SIGKILL))
    with _opened(cfg) as side:  # one of the two workers claims the fault
        puts, sent = _spy_on_weights(monkeypatch)
        side.update_weights(_perturbed(stopping_model_dir), 1)
        assert len(puts) == 1 and len(sent) == 2 and all(ref is puts[0] for ref in sent)  # one object, both workers
        victim = int((fault_dir / "claimed").read_text())
        killer.start()
        got = side.play(SPECS, 1.0, seed=7)  # step completes
        killer.join()
        counts = side.worker_metrics()
        assert counts["workers/lost"] == 1 and counts["workers/restarted"] == 1
        assert counts["episodes/rerun"] == 2 and "episodes/lost" not in counts  # the slices: one group each
        assert all(t.error is None for t in got)
        # The restarted worker was pushed the step's weights: the same object again, nothing put anew.
        assert len(puts) == 1 and len(sent) == 3 and all(ref is puts[0] for ref in sent)
        health = side.health()  # the restarted worker is back, a new process, with the current weights
        assert victim not in {h.pid for h in health} and {h.version for h in health} == {1}
        assert _same(got, side.play(SPECS, 1.0, seed=7))  # the re-run slice equals a run without the fault


def _sampled_versions(trajectory) -> list[int]:
    return [v for v, m in zip(trajectory.weight_versions, trajectory.loss_mask) if m]


def test_weights_pushed_while_a_play_runs_reach_it_and_a_worker_restarted_mid_play(ray_session, tiny_model_dir,
                                                                                  fault_dir, monkeypatch, request):
    """The asynchronous schedule pushes weights from the trainer's thread while the producer's thread
    plays. One worker's engine never answers its first request (its slice holds the play open); the
    other is mid-turn when the weights are pushed (its engine pauses after 20 tokens until they arrive:
    on a loaded machine its 160-token turns once ended before the push), then the stuck worker is
    SIGKILLed. Last, `abort()` ends a play (the producer's, when the run stops) and leaves the pool ready
    for the next one."""
    (fault_dir / "hold-for-push").write_text("")
    request.addfinalizer(lambda: (fault_dir / "hold-for-push").unlink(missing_ok=True))  # the folder is the module's
    cfg = _cfg(tiny_model_dir, "rollout.engine=test-stalling", "cluster.health_timeout_s=600", "rollout.max_turns=1",
               "rollout.max_tokens_per_turn=160", "rollout.max_total_tokens=1024")
    stalled = _stall_then(fault_dir, lambda pid: None)
    with _opened(cfg) as side:  # one of the two workers claims the fault
        puts, sent = _spy_on_weights(monkeypatch)
        victim = int((fault_dir / "claimed").read_text())
        bad = [h.pid for h in side.health()].index(victim)
        healthy = side.slots[1 - bad].actor
        weights = _perturbed(tiny_model_dir)
        out: list = []
        player = threading.Thread(target=lambda: out.append(side.play(SPECS, 1.0, seed=7)))
        stalled.start()
        player.start()
        stalled.join()
        deadline = time.monotonic() + 120
        while ray_get(call(healthy, "health")).generated_tokens < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        side.update_weights(weights, 1)  # from this thread, while the play runs
        assert player.is_alive()  # the stuck slice holds the play: the push did not wait for it
        os.kill(victim, signal.SIGKILL)
        player.join(timeout=300)
        got = out[0]
        counts = side.worker_metrics()
        assert counts["workers/lost"] == 1 and counts["workers/restarted"] == 1 and counts["episodes/rerun"] == 2
        assert all(t.error is None for t in got)
        # One object put; both workers, then the restarted one, were sent it.
        assert len(puts) == 1 and len(sent) == 3 and all(ref is puts[0] for ref in sent)
        health = side.health()
        assert victim not in {h.pid for h in health} and {h.version for h in health} == {1}
        _abort_a_play(side)
    versions = [_sampled_versions(t) for t in got]
    assert all(vs and vs == sorted(vs) and set(vs) <= {0, 1} for vs in versions)  # each token keeps its version
    # Worker `bad` took slice `bad` (one group) first: played again after the kill, with the new weights
    # only. The healthy worker's first slice went on across the push: old tokens, then new ones.
    assert all(set(vs) == {1} for vs in versions[2 * bad:2 * bad + 2])
    assert any(set(vs) == {0, 1} for vs in versions[2 * (1 - bad):2 * (1 - bad) + 2])


def _abort_a_play(side: RayRolloutSide) -> None:
    """`abort()` mid-play: the play raises PlayAborted within seconds, and the next play runs normally."""
    errors: list[BaseException] = []

    def play():
        try:
            side.play(SPECS, 1.0, seed=8)
        except PlayAborted as exc:
            errors.append(exc)

    player = threading.Thread(target=play)
    player.start()
    deadline = time.monotonic() + 120
    while not any(ray_get(call(s.actor, "health")).in_flight for s in side.slots) and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    side.abort()
    player.join(timeout=60)
    assert not player.is_alive() and time.monotonic() - t0 < 15 and len(errors) == 1
    assert "aborted with 1 of its slices not handed out" in str(errors[0])  # 3 slices, 2 workers
    assert all(t.error is None for t in side.play(SPECS[:2], 1.0, seed=8))


def test_hung_engine_is_detected_within_seconds_and_restarted(ray_session, stopping_model_dir, fault_dir):
    timeout = 2.0
    cfg = _cfg(stopping_model_dir, "rollout.engine=test-stalling", f"cluster.health_timeout_s={timeout}")
    stalled_at: list[float] = []
    watcher = _stall_then(fault_dir, lambda pid: stalled_at.append(time.monotonic()))
    with _opened(cfg) as side:  # one of the two workers claims the fault
        side.update_weights(_perturbed(stopping_model_dir), 1)
        watcher.start()
        got = side.play(SPECS, 1.0, seed=7)
        done = time.monotonic()
        watcher.join()
        # Detected after health_timeout_s of no progress (+ one probe interval); the re-run slice takes
        # the rest. No barrier waits: far from the minutes an unanswered request would otherwise hang.
        assert done - stalled_at[0] < timeout + 8
        counts = side.worker_metrics()
        assert counts["workers/hung"] == 1 and counts["workers/restarted"] == 1
        assert all(t.error is None for t in got)
        assert {h.version for h in side.health()} == {1}
        assert _same(got, side.play(SPECS, 1.0, seed=7))


def test_frozen_worker_is_killed_when_it_answers_no_health_check(ray_session, stopping_model_dir, fault_dir, caplog):
    timeout = 2.0
    cfg = _cfg(stopping_model_dir, "rollout.engine=test-stalling", f"cluster.health_timeout_s={timeout}")
    frozen = _stall_then(fault_dir, lambda pid: os.kill(pid, signal.SIGSTOP))  # the whole process stops
    with _opened(cfg) as side:
        frozen.start()
        with caplog.at_level(logging.WARNING, logger="agentrl.driver.rollout_pool"):
            got = side.play(SPECS, 1.0, seed=7)
        frozen.join()
        assert "answered no health check for" in caplog.text  # no answer at all, not a slow engine
        counts = side.worker_metrics()
        assert counts["workers/hung"] == 1 and counts["workers/restarted"] == 1
        assert all(t.error is None for t in got)
        assert _same(got, side.play(SPECS, 1.0, seed=7))
        # Frozen between steps: the weight push does not wait on it past two health timeouts.
        os.kill(side.health()[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        side.update_weights(_perturbed(stopping_model_dir), 1)
        assert time.monotonic() - t0 < 2 * timeout + 10
        assert side.worker_metrics()["workers/hung"] == 1
        assert {h.version for h in side.health()} == {1}  # restarted, and given the new weights


def test_worker_lost_for_good_fails_its_episodes_as_data(ray_session, stopping_model_dir, fault_dir):
    cfg = _cfg(stopping_model_dir, "rollout.engine=test-stalling", "cluster.health_timeout_s=600",
               "cluster.max_worker_restarts=0", "cluster.max_episode_retries=0")
    killer = _stall_then(fault_dir, lambda pid: os.kill(pid, signal.SIGKILL))
    with _opened(cfg) as side:
        killer.start()
        got = side.play(SPECS, 1.0, seed=7)
        killer.join()
        failed = [i for i, t in enumerate(got) if t.error is not None]
        assert failed in ([0, 1], [2, 3])  # the victim's first slice: group 0 or group 1
        for i in failed:
            t = got[i]
            assert t.failure == "worker_lost" and t.error.startswith("worker process lost")
            assert t.reward == 0.0 and not t.token_ids
            assert (t.seed, t.group_id) == (SPECS[i].seed, SPECS[i].group_id)
        counts = side.worker_metrics()
        assert counts["episodes/lost"] == len(failed) and "workers/restarted" not in counts
        again = side.play(SPECS, 1.0, seed=7)  # the survivor plays everything
        assert all(t.error is None for t in again)
        assert sum(h is None for h in side.health()) == 1  # gone for good, and no longer given work


def test_each_worker_gets_the_engine_options_and_a_server_log_folder_of_its_own(ray_session, tiny_model_dir,
                                                                                  tmp_path):
    cfg = _cfg(tiny_model_dir, "rollout.engine=test-server-shaped", "rollout.server.url=http://127.0.0.1:9",
               "rollout.engine_options.attention_backend=fa3", f"run_dir={tmp_path / 'run'}")
    with _opened(cfg) as side:
        pids = {h.pid for h in side.health()}
        seen = [json.loads((tmp_path / "run" / "servers" / f"worker-{i}" / "engine.json").read_text()) for i in (0, 1)]
    assert {s["pid"] for s in seen} == pids and os.getpid() not in pids  # built in the workers
    for i, s in enumerate(seen):
        assert s["url"] == "http://127.0.0.1:9" and s["options"] == {"attention_backend": "fa3"}
        assert s["log_dir"] == str((tmp_path / "run" / "servers" / f"worker-{i}").resolve())
        assert (tmp_path / "run" / "servers" / f"worker-{i}" / "closed").exists()  # close() reached the engine
