"""The rollout side on Ray: `cluster.rollout_workers` rollout workers behind `RolloutSide`'s interface.

`RayRolloutSide` has what `collect`, `evaluate` and the loop use of `RolloutSide` (`cfg`, `path`,
`tokenizer`, `play`, `update_weights`, `sleep`, `wake`, `abort`, `worker_metrics`, `close`), so they
run unchanged on one engine in-process or on N engines in Ray actors.

A batch is cut into `cluster.rollout_workers x cluster.calls_per_worker` slices of whole GRPO groups
(a group's shared prompt is prefilled once, and every turn of an episode runs on one engine by
construction). The cut depends on the batch and the config only, never on timing or on which workers
are alive. Slices are handed out as workers free up: each worker plays one slice at a time, and the
next slice goes to the first free one, so a slow worker (a slower device, slow tools, one that has
just restarted) plays fewer groups and does not hold the step. Each episode keeps the sampling seed
of its place in the whole batch, and a worker clears its prefix cache before each slice, so with
lockstep (CPU) a slice's trajectories are a function of the slice, the weights and the seed alone:
the same whichever worker, fresh or restarted, plays it. (They are not the same as one engine
playing the whole batch: the forward passes batch other rows, and float results move in the last
bits.)

One call in flight per worker is what "the engine with the fewest outstanding episodes" comes to
here: with lockstep a slice's batches must not mix with another slice's (they would depend on
timing), and a second slice queued behind a slow worker's would hold the step's tail.

Workers fail, and the batch goes on (`rollout_round.Round`): a worker whose process dies (SIGKILL, OOM, a lost
node) fails its call; one whose engine stops answering (no health answer, or requests in flight and
no progress, for `cluster.health_timeout_s`) is killed. Either way Ray restarts it (up to
`cluster.max_worker_restarts`), the driver pushes it the current weights, and its slice is played
again by the first free worker, up to `cluster.max_episode_retries` times; after that the slice's
episodes are recorded as failed (failure class `worker_lost`) and never trained on. Counts per step come out of
`worker_metrics()`.

Weights may be pushed while a play runs (the asynchronous schedule: the producer thread plays, the
trainer's thread pushes). Each push is one `ray.put`; the workers copy it into their engines from a
thread of their own, between two engine steps of the slice they play. The driver's book of the
workers (`Slot`s) is shared by the two threads under one lock, held only between Ray calls, never
while waiting; a worker's loss is handled once, by the play running on it if there is one (`Round`),
else by whoever was waiting on it, and calls sent to a worker before it restarted (its `generation`)
are ignored after. A restarted worker is sent the newest weights before it gets work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agentrl.config import Config
from agentrl.driver.cluster import Bundle
from agentrl.driver.failures import FailurePolicy
from agentrl.driver.preflight import build_env, check_model_dir, first_line
from agentrl.driver.rollout_round import Round, Slice, Slot, call, cause, plus, split_by_groups
from agentrl.driver.rollout_side import DTYPES, engine_plan, load_renderer, lockstep_on
from agentrl.envs.registration import ENVS
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec
from agentrl.rollout.engine import SamplingParams
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.rollout.workers import CONCURRENCY_GROUPS, RolloutWorker, WorkerHealth, WorkerSetup

logger = logging.getLogger(__name__)


class PoolMeter:
    """`RolloutSide.engine`'s `use()` for the workers together: token counts summed over the slices
    played, and as busy time the busiest worker's engine time in each `play` (the workers run at
    once, so their busy seconds overlap; summing them would exceed the wall time)."""

    def __init__(self):
        self.total = EngineUse()

    def use(self) -> EngineUse:
        return self.total

    def add_round(self, per_worker: dict[int, EngineUse]) -> None:
        if per_worker:
            busiest = max(u.busy_s for u in per_worker.values())
            self.total = plus(self.total, *per_worker.values(), busy_s=self.total.busy_s + busiest)



def _with_server_logs(kwargs: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """An engine's keywords with its server's log in `log_dir` (one folder per worker: each launches its own)."""
    if "server" not in kwargs:
        return dict(kwargs)
    return {**kwargs, "server": replace(kwargs["server"], log_dir=str(log_dir.resolve()))}


class RayRolloutSide:
    """Rollout workers as Ray actors; see the module docstring."""

    def __init__(self, cfg: Config, path: str, tokenizer: object, slots: list[Slot]):
        self.cfg, self.path, self.tokenizer, self.slots = cfg, path, tokenizer, slots
        self.engine = PoolMeter()  # what collect() reads as `rollout.engine.use()`
        self.version = 0
        self.weights_ref = None
        self.counts: dict[str, float] = {}
        self.node_ids: list[str] = []  # the Ray node each worker started on
        self.mutex = threading.RLock()  # over `slots`, `counts`, `version`: plays and pushes run on two threads
        self.round: Round | None = None  # the play in progress

    @classmethod
    def open(cls, cfg: Config, bundles: list[Bundle], splits: Sequence[tuple[str, str]] = ()) -> RayRolloutSide:
        """Check the model and env here (cheap, one line on failure), then start a worker per bundle."""
        import ray

        path, r, c = cfg.model.path, cfg.rollout, cfg.cluster
        check_model_dir(path, "model.path", r.max_total_tokens)
        FailurePolicy.for_env(cfg.failures, cfg.env.id)  # an env's bad failure_policy is refused before any load
        plan = engine_plan(cfg, path, "model.path", None)
        probe = build_env(cfg.env.id, cfg.env.kwargs)
        try:
            tokenizer, _ = load_renderer(cfg, path, "model.path", probe, splits)
        finally:
            probe.close()
        setup = WorkerSetup(engine=plan.engine, model_path=path, device=cfg.model.device,
                            dtype=DTYPES[cfg.model.dtype], max_model_len=r.max_total_tokens + 1, env_id=cfg.env.id,
                            env_kwargs=dict(cfg.env.kwargs), env_spec=ENVS.spec(cfg.env.id),
                            template_kwargs=dict(cfg.model.chat_template_kwargs),
                            limits=EpisodeLimits(r.max_turns, r.max_total_tokens, cfg.failures.episode_timeout_s,
                                                 cfg.failures.request_timeout_s), lockstep=lockstep_on(cfg))
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        logs = Path(cfg.run_dir) / "servers"
        slots = [Slot(i, actor.options(max_restarts=c.max_worker_restarts, max_task_retries=0, **b.options()).remote(
            replace(setup, engine_kwargs=_with_server_logs(plan.kwargs, logs / f"worker-{i}"))))
            for i, b in enumerate(bundles)]
        side = cls(cfg, path, tokenizer, slots)
        try:
            side.node_ids = side._wait_started()
        except BaseException:
            side.close()
            raise
        return side

    def _wait_started(self) -> list[str]:
        """Each worker's Ray node id once all have loaded their engine; a worker that cannot start is a ConfigError."""
        import ray

        refs = [call(s.actor, "health") for s in self.slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.cluster.start_timeout_s)
        if len(ready) < len(refs):
            raise ConfigError(f"{len(refs) - len(ready)} rollout worker(s) did not start within "
                              f"cluster.start_timeout_s={self.cfg.cluster.start_timeout_s:g} s")
        try:
            return [h.node_id for h in ray.get(refs)]
        except ray.exceptions.RayError as exc:
            raise ConfigError(f"a rollout worker failed to start: {first_line(cause(exc))}") from None

    # -- RolloutSide's interface -------------------------------------------------------------
    def sampling(self, temperature: float, seed: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_tokens=r.max_tokens_per_turn, seed=seed)

    def play(self, specs: list[EpisodeSpec], temperature: float, seed: int | None = None) -> list[Trajectory]:
        """Play `specs` on the workers; one trajectory each, in the order of `specs`."""
        # Each episode is seeded by its place in the whole batch, whichever worker plays it.
        specs = [s if s.index is not None else replace(s, index=i) for i, s in enumerate(specs)]
        c = self.cfg.cluster
        slices = [Slice(ix) for ix in split_by_groups(specs, c.rollout_workers * c.calls_per_worker)]
        return Round(self, specs, self.sampling(temperature, seed), slices).run()

    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Put the weights into Ray's object store once; every worker copies the same object into its engine.

        Returns once every live worker holds `version` (one restarting is sent it, and gets no work before
        it holds it). May run while `play` runs on another thread: a worker playing a slice swaps the
        weights in between two engine steps, and the slice's later tokens record the new version.
        """
        import ray

        ref = ray.put(dict(state_dict))
        with self.mutex:
            self.weights_ref, self.version = ref, version
            calls = {}
            for slot in self.slots:
                if slot.dead:
                    continue
                if slot.starting is not None:  # restarting: it takes these weights once it is back
                    self.restart_push(slot)
                else:
                    calls[slot.index] = (call(slot.actor, "update_weights", ref, version), slot.generation)
        done = self._await_calls("update_weights", calls)
        with self.mutex:
            for index in done:
                slot = self.slots[index]
                if slot.starting is None:
                    slot.version = max(slot.version, version)

    def sleep(self) -> float:
        """Every live worker frees its engine's KV cache; returns the seconds it took (all of them, in parallel)."""
        return self._all("sleep")

    def wake(self) -> float:
        return self._all("wake")

    def abort(self) -> None:
        """End the workers' requests in flight (their episodes end truncated, `abort`); the play in progress,
        if any, hands out no more slices and raises `PlayAborted` once the workers' calls are back."""
        with self.mutex:
            if self.round is not None:
                self.round.aborted = True
            live = [slot for slot in self.slots if not slot.dead]
        for slot in live:
            call(slot.actor, "abort")

    def health(self) -> list[WorkerHealth | None]:
        """Each worker's health, waiting up to cluster.start_timeout_s for restarting ones (None: gone for good).
        For tests and between steps: it holds the pool's lock while it waits, so a play in progress pauses."""
        import ray

        with self.mutex:
            for slot in self.slots:
                if slot.starting is not None:
                    try:
                        ray.get(slot.starting, timeout=self.cfg.cluster.start_timeout_s)
                        slot.starting, slot.version = None, slot.starting_version
                    except ray.exceptions.RayError as exc:
                        self._lost(slot, f"restart failed: {first_line(exc)}")
            return [None if s.dead else ray.get(call(s.actor, "health", after_restart=True),
                                                timeout=self.cfg.cluster.start_timeout_s) for s in self.slots]

    def worker_metrics(self) -> dict[str, float]:
        """Worker losses, hangs and restarts, and episodes played again or lost, since the last call."""
        with self.mutex:
            out, self.counts = self.counts, {}
        return out

    def close(self) -> None:
        """Close every worker's envs (a few seconds at most), then end the worker processes."""
        import ray

        live = [s for s in self.slots if not s.dead]
        ray.wait([call(s.actor, "close") for s in live], num_returns=len(live), timeout=5)
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)  # a dead or stuck worker too
        self.slots = []

    # -- failures ------------------------------------------------------------------------------
    def _all(self, method: str) -> float:
        """Call `method` on every ready worker at once; the wall seconds until all answered."""
        t0 = time.perf_counter()
        self._on_all(method)
        return time.perf_counter() - t0

    def _on_all(self, method: str, *args) -> dict[int, Any]:
        """`method(*args)` on every ready worker; the answers by worker index (see `_await_calls`)."""
        with self.mutex:
            calls = {s.index: (call(s.actor, method, *args), s.generation) for s in self.slots
                     if not s.dead and s.starting is None}
        return self._await_calls(method, calls)

    def _await_calls(self, method: str, calls: dict[int, tuple[Any, int]]) -> dict[int, Any]:
        """The answers to `calls` (worker index -> (the call, the worker's generation when it was sent)).

        No long barrier: a call still pending after cluster.health_timeout_s has its worker probed, and
        one that answers no health check within that time either (or has not answered the call within
        cluster.start_timeout_s) is killed. A worker lost meanwhile is restarted and left out of the
        result; one that is playing a slice (weights pushed during a play) is left to that play's `Round`,
        which watches it and handles its loss.
        """
        import ray

        c = self.cfg.cluster
        out: dict[int, Any] = {}
        deadline = time.monotonic() + c.start_timeout_s
        while calls:
            done, _ = ray.wait([ref for ref, _ in calls.values()], num_returns=len(calls), timeout=c.health_timeout_s)
            with self.mutex:
                for index, (ref, generation) in list(calls.items()):
                    slot = self.slots[index]
                    if ref in done:
                        del calls[index]
                        try:
                            value = ray.get(ref)
                        except ray.exceptions.RayActorError as exc:
                            if self._unwatched(slot, generation):
                                self._lost(slot, f"{method} failed: {first_line(exc)}")
                            continue
                        except ray.exceptions.RayTaskError as exc:  # a bug or a setup error in the worker
                            raise cause(exc) from None
                        if slot.generation == generation:
                            out[index] = value
                    elif slot.generation != generation:  # lost and restarted since (with the newest weights)
                        del calls[index]
                probes = {i: call(self.slots[i].actor, "health") for i, (_, generation) in calls.items()
                          if self._unwatched(self.slots[i], generation)}
            if not probes:  # each pending call's worker is playing: its Round watches it
                continue
            answered, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=c.health_timeout_s)
            with self.mutex:
                for i, probe in probes.items():
                    slot = self.slots[i]
                    if i not in calls or not self._unwatched(slot, calls[i][1]):
                        continue
                    if probe not in answered or time.monotonic() > deadline:
                        del calls[i]
                        self._count("workers/hung")
                        ray.kill(slot.actor, no_restart=False)
                        why = "answered no health check" if probe not in answered else "did not finish"
                        self._lost(slot, f"{why} during {method} (cluster.health_timeout_s="
                                         f"{c.health_timeout_s:g}, start_timeout_s={c.start_timeout_s:g})")
        return out

    @staticmethod
    def _unwatched(slot: Slot, generation: int) -> bool:
        """Whether a call sent to `slot`'s worker in `generation` is this caller's to watch: the worker has
        not restarted since, and no play runs on it (a play's `Round` handles the loss of its worker)."""
        return slot.generation == generation and slot.work is None

    def _count(self, key: str, n: float = 1.0) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n

    def _lost(self, slot: Slot, reason: str) -> None:
        """The worker died or was killed: Ray restarts it (while restarts remain) and it gets the newest
        weights. Calls sent to it before are ignored from now on (its generation moves on). Holds the mutex."""
        self._count("workers/lost")
        slot.work = slot.ref = slot.probe = None
        slot.kill_reason = None
        slot.restarts += 1
        slot.generation += 1
        limit = self.cfg.cluster.max_worker_restarts
        if slot.restarts > limit:
            slot.dead = True
            logger.warning("rollout worker %d lost for good: %s (cluster.max_worker_restarts=%d used up)",
                           slot.index, reason, limit)
            return
        logger.warning("rollout worker %d lost: %s; restarting it (%d of %d)", slot.index, reason, slot.restarts, limit)
        self._count("workers/restarted")
        slot.version = None
        slot.started_at = time.monotonic()
        self.restart_push(slot)

    def restart_push(self, slot: Slot) -> None:
        """Send a (re)starting worker the newest weights; Ray delivers the call once the worker is back, and
        the worker gets no work before it answered. Holds the mutex."""
        slot.starting_version = self.version
        slot.starting = (call(slot.actor, "update_weights", self.weights_ref, self.version, after_restart=True)
                         if self.weights_ref is not None else call(slot.actor, "health", after_restart=True))


