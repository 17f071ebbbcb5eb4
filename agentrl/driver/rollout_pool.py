"""The rollout side on Ray: `cluster.rollout_workers` rollout workers behind `RolloutSide`'s interface.

`RayRolloutSide` has what `collect`, `evaluate` and the loop use of `RolloutSide` (`cfg`, `path`,
`tokenizer`, `play`, `update_weights`, `sleep`, `wake`, `abort`, `worker_metrics`, `close`), so they
run unchanged on one engine in-process or on N engines in Ray actors.

A batch is split into one slice per worker, whole GRPO groups each (a group's shared prompt is
prefilled once, and every turn of an episode runs on one engine by construction). Each episode keeps
the sampling seed of its place in the whole batch, and a worker clears its prefix cache before each
slice, so with lockstep (CPU) a slice's trajectories are a function of the slice, the weights and
the seed alone: the same whichever worker, fresh or restarted, plays it. (They are not the same as
one engine playing the whole batch: the forward passes batch other rows, and float results move in
the last bits.)

Workers fail, and the batch goes on (`_Round`): a worker whose process dies (SIGKILL, OOM, a lost
node) fails its call; one whose engine stops answering (no health answer, or requests in flight and
no progress, for `cluster.health_timeout_s`) is killed. Either way Ray restarts it (up to
`cluster.max_worker_restarts`), the driver pushes it the current weights, and its slice is played
again by the first free worker, up to `cluster.max_episode_retries` times; after that the slice's
episodes are recorded as failed (`lost_episode`) and never trained on. Counts per step come out of
`worker_metrics()`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from agentrl.config import Config
from agentrl.driver.cluster import Bundle
from agentrl.driver.preflight import build_env, check_model_dir, first_line
from agentrl.driver.rollout_side import DTYPES, load_renderer, lockstep_on
from agentrl.envs.registration import ENVS
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec
from agentrl.rollout.engine import ENGINES, SamplingParams
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.rollout.workers import (CONCURRENCY_GROUPS, METHOD_GROUPS, RolloutWorker, StaleWeightsError, WorkerHealth,
                                     WorkerSetup)

logger = logging.getLogger(__name__)
WORKER_LOST = "WorkerLost"  # error prefix of an episode no worker could play


def lost_episode(spec: EpisodeSpec, env_id: str, reason: str) -> Trajectory:
    """The record of an episode that could not be played because its workers were lost: no tokens,
    reward 0, `error` set (so it is counted and never trained on)."""
    return Trajectory(token_ids=(), loss_mask=(), rollout_logprobs=(), weight_versions=(), prompt_length=0,
                      turn_spans=(), turn_rewards=(), reward=0.0, env_id=env_id, task_id=f"{spec.split}-{spec.seed}",
                      split=spec.split, seed=spec.seed, group_id=spec.group_id, num_turns=0, truncation="error",
                      error=f"{WORKER_LOST}: {reason}")


def split_by_groups(specs: Sequence[EpisodeSpec], parts: int) -> list[list[int]]:
    """Indices of `specs` in at most `parts` slices of whole groups (by group_id, in order of first
    appearance), as even in groups as they can be; empty slices are left out."""
    groups: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec.group_id, []).append(i)
    order = list(groups.values())
    bounds = [len(order) * k // parts for k in range(parts + 1)]
    slices = [[i for g in order[bounds[k]:bounds[k + 1]] for i in g] for k in range(parts)]
    return [s for s in slices if s]


def _call(actor, method: str, *args, after_restart: bool = False):
    """`actor.method.remote(*args)` in the method's concurrency group.

    A call to a worker that is restarting fails at once (ActorUnavailableError) unless Ray may retry
    it: `after_restart=True` (for idempotent calls: pushing weights, health) makes Ray deliver it once
    the worker is back. Plays are never retried by Ray; the pool decides where a slice runs again.
    """
    retries = {"max_task_retries": -1} if after_restart else {}
    return getattr(actor, method).options(concurrency_group=METHOD_GROUPS[method], **retries).remote(*args)


@dataclass
class _Slice:
    indices: list[int]
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    """One worker as the driver sees it."""

    index: int
    actor: Any
    version: int | None = 0  # weights it holds; None while a restart's push is in flight
    work: _Slice | None = None
    ref: Any = None  # its play call in flight
    starting: Any = None  # a restarted worker's weight push in flight
    started_at: float = 0.0
    probe: Any = None
    probe_sent: float = 0.0
    probe_done: float = 0.0
    kill_reason: str | None = None
    restarts: int = 0
    dead: bool = False


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
            self.total = _plus(self.total, *per_worker.values(), busy_s=self.total.busy_s + busiest)


def _plus(*uses: EngineUse, **fixed: float) -> EngineUse:
    """The field-wise sum of `uses`, with the fields in `fixed` set as given."""
    return EngineUse(**{f.name: fixed.get(f.name, sum(getattr(u, f.name) for u in uses)) for f in fields(EngineUse)})


class RayRolloutSide:
    """Rollout workers as Ray actors; see the module docstring."""

    def __init__(self, cfg: Config, path: str, tokenizer: object, slots: list[_Slot]):
        self.cfg, self.path, self.tokenizer, self.slots = cfg, path, tokenizer, slots
        self.engine = PoolMeter()  # what collect() reads as `rollout.engine.use()`
        self.version = 0
        self.weights_ref = None
        self.counts: dict[str, float] = {}
        self.node_ids: list[str] = []  # the Ray node each worker started on

    @classmethod
    def open(cls, cfg: Config, bundles: list[Bundle], splits: Sequence[tuple[str, str]] = ()) -> RayRolloutSide:
        """Check the model and env here (cheap, one line on failure), then start a worker per bundle."""
        import ray

        path, r, c = cfg.model.path, cfg.rollout, cfg.cluster
        check_model_dir(path, "model.path", r.max_total_tokens)
        probe = build_env(cfg.env.id, cfg.env.kwargs)
        try:
            tokenizer, _ = load_renderer(cfg, path, "model.path", probe, splits)
        finally:
            probe.close()
        setup = WorkerSetup(engine=ENGINES.get(r.engine), model_path=path, device=cfg.model.device,
                            dtype=DTYPES[cfg.model.dtype], max_model_len=r.max_total_tokens + 1, env_id=cfg.env.id,
                            env_kwargs=dict(cfg.env.kwargs), env_spec=ENVS.spec(cfg.env.id),
                            template_kwargs=dict(cfg.model.chat_template_kwargs),
                            limits=EpisodeLimits(r.max_turns, r.max_total_tokens), lockstep=lockstep_on(cfg))
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        slots = [_Slot(i, actor.options(max_restarts=c.max_worker_restarts, max_task_retries=0,
                                        **b.options()).remote(setup)) for i, b in enumerate(bundles)]
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

        refs = [_call(s.actor, "health") for s in self.slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.cluster.start_timeout_s)
        if len(ready) < len(refs):
            raise ConfigError(f"{len(refs) - len(ready)} rollout worker(s) did not start within "
                              f"cluster.start_timeout_s={self.cfg.cluster.start_timeout_s:g} s")
        try:
            return [h.node_id for h in ray.get(refs)]
        except ray.exceptions.RayError as exc:
            raise ConfigError(f"a rollout worker failed to start: {first_line(_cause(exc))}") from None

    # -- RolloutSide's interface -------------------------------------------------------------
    def sampling(self, temperature: float, seed: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_tokens=r.max_tokens_per_turn, seed=seed)

    def play(self, specs: list[EpisodeSpec], temperature: float, seed: int | None = None) -> list[Trajectory]:
        """Play `specs` on the workers; one trajectory each, in the order of `specs`."""
        live = [s for s in self.slots if not s.dead]
        slices = [_Slice(ix) for ix in split_by_groups(specs, max(len(live), 1))]
        return _Round(self, specs, self.sampling(temperature, seed), slices).run()

    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Put the weights into Ray's object store once; every worker copies the same object into its engine."""
        import ray

        self.weights_ref, self.version = ray.put(dict(state_dict)), version
        calls = {s.index: _call(s.actor, "update_weights", self.weights_ref, version)
                 for s in self.slots if not s.dead and s.starting is None}
        for slot in self.slots:
            if slot.index in calls:
                try:
                    ray.get(calls[slot.index], timeout=self.cfg.cluster.start_timeout_s)
                    slot.version = version
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                    self._lost(slot, f"weight update failed: {first_line(exc)}")
            elif slot.starting is not None:  # a restarting worker: push the new weights after its restart
                slot.starting = _call(slot.actor, "update_weights", self.weights_ref, version, after_restart=True)

    def sleep(self) -> float:
        """Every live worker frees its engine's KV cache; returns the longest time one took."""
        return self._all("sleep")

    def wake(self) -> float:
        return self._all("wake")

    def abort(self) -> None:
        for slot in self.slots:
            if not slot.dead:
                _call(slot.actor, "abort")

    def health(self) -> list[WorkerHealth | None]:
        """Each worker's health, waiting up to cluster.start_timeout_s for restarting ones (None: gone for good)."""
        import ray

        for slot in self.slots:
            if slot.starting is not None:
                try:
                    ray.get(slot.starting, timeout=self.cfg.cluster.start_timeout_s)
                    slot.starting, slot.version = None, self.version
                except ray.exceptions.RayError as exc:
                    self._lost(slot, f"restart failed: {first_line(exc)}")
        return [None if s.dead else ray.get(_call(s.actor, "health", after_restart=True),
                                            timeout=self.cfg.cluster.start_timeout_s) for s in self.slots]

    def worker_metrics(self) -> dict[str, float]:
        """Worker losses, hangs and restarts, and episodes played again or lost, since the last call."""
        out, self.counts = self.counts, {}
        return out

    def close(self) -> None:
        """Close every worker's envs (a few seconds at most), then end the worker processes."""
        import ray

        live = [s for s in self.slots if not s.dead]
        ray.wait([_call(s.actor, "close") for s in live], num_returns=len(live), timeout=5)
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)  # a dead or stuck worker too
        self.slots = []

    # -- failures ------------------------------------------------------------------------------
    def _all(self, method: str) -> float:
        """Call `method` on every ready worker; the longest time one reports. A worker found lost is restarted."""
        import ray

        calls = [(s, _call(s.actor, method)) for s in self.slots if not s.dead and s.starting is None]
        longest = 0.0
        for slot, ref in calls:
            try:
                longest = max(longest, ray.get(ref, timeout=self.cfg.cluster.start_timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                self._lost(slot, f"{method} failed: {first_line(exc)}")
        return longest

    def _count(self, key: str, n: float = 1.0) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n

    def _lost(self, slot: _Slot, reason: str) -> None:
        """The worker died or was killed: Ray restarts it (while restarts remain) and it gets the current weights."""
        self._count("workers/lost")
        slot.work = slot.ref = slot.probe = None
        slot.kill_reason = None
        slot.restarts += 1
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
        slot.starting = (_call(slot.actor, "update_weights", self.weights_ref, self.version, after_restart=True)
                         if self.weights_ref is not None else _call(slot.actor, "health", after_restart=True))


def _cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside a Ray error."""
    return getattr(exc, "cause", None) or exc


class _Round:
    """One `play` call: hands out slices, watches the workers, plays a lost worker's slice again."""

    def __init__(self, side: RayRolloutSide, specs: list[EpisodeSpec], sampling: SamplingParams, slices: list[_Slice]):
        self.side, self.specs, self.sampling = side, specs, sampling
        self.queue = deque(slices)
        self.out: list[Trajectory | None] = [None] * len(specs)
        c = side.cfg.cluster
        self.timeout, self.start_timeout = c.health_timeout_s, c.start_timeout_s
        self.tick = min(1.0, self.timeout / 4)
        self.use: dict[int, EngineUse] = {}  # per worker, over the slices it finished

    def run(self) -> list[Trajectory]:
        import ray

        while self.queue or any(slot.ref is not None for slot in self.side.slots):
            self._hand_out()
            refs = self._refs()
            if not refs:
                break
            ray.wait(list(refs), num_returns=1, timeout=self.tick)
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                self._finished(*refs[ref], ref)
            self._check_health()
        for sl in self.queue:  # every worker is gone for good
            self._give_up(sl, "no rollout worker is left (each used up cluster.max_worker_restarts)")
        self.side.engine.add_round(self.use)
        return self.out  # type: ignore[return-value]

    def _refs(self) -> dict[Any, tuple[str, _Slot]]:
        refs: dict[Any, tuple[str, _Slot]] = {}
        for slot in self.side.slots:
            if slot.ref is not None:
                refs[slot.ref] = ("play", slot)
            if slot.starting is not None:
                refs[slot.starting] = ("start", slot)
            if slot.probe is not None:
                refs[slot.probe] = ("probe", slot)
        return refs

    def _hand_out(self) -> None:
        for slot in self.side.slots:
            if self.queue and not slot.dead and slot.work is None and slot.starting is None:
                sl = self.queue.popleft()
                slot.work, slot.probe, slot.probe_done = sl, None, time.monotonic()
                slot.ref = _call(slot.actor, "play", [self.specs[i] for i in sl.indices], sl.indices, self.sampling,
                                 self.side.version)

    def _finished(self, kind: str, slot: _Slot, ref) -> None:
        import ray

        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if kind == "probe":
                slot.probe = None  # the play call reports the loss
                return
            self._worker_lost(slot, slot.kill_reason or f"worker process lost ({first_line(exc)})")
            return
        except StaleWeightsError:  # it restarted unseen (between steps): push the weights, play the slice again
            self.queue.appendleft(slot.work)
            slot.work = slot.ref = None
            slot.version, slot.started_at = None, time.monotonic()
            slot.starting = _call(slot.actor, "update_weights", self.side.weights_ref, self.side.version,
                                  after_restart=True)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug or a setup error in the worker: stop the run with it
            raise _cause(exc) from None
        if kind == "probe":
            slot.probe, slot.probe_done = None, time.monotonic()
            if slot.work is not None and value.stalled_s > self.timeout:
                self._kill(slot, f"engine hung: {value.in_flight} request(s) in flight and no progress for "
                                 f"{value.stalled_s:.1f} s (cluster.health_timeout_s={self.timeout:g})")
        elif kind == "start":
            slot.starting, slot.version = None, self.side.version
        else:
            trajectories, use = value
            for i, traj in zip(slot.work.indices, trajectories):
                self.out[i] = traj
            self.use[slot.index] = _plus(self.use.get(slot.index, EngineUse()), use)
            slot.work = slot.ref = None

    def _worker_lost(self, slot: _Slot, reason: str) -> None:
        sl = slot.work
        self.side._lost(slot, reason)
        if sl is None:  # lost while restarting: it is restarted again (or given up) by `_lost`
            return
        sl.attempts += 1
        sl.reasons.append(reason)
        if sl.attempts > self.side.cfg.cluster.max_episode_retries:
            self._give_up(sl, f"{'; '.join(sl.reasons)} (played {sl.attempts} times, cluster.max_episode_retries="
                              f"{self.side.cfg.cluster.max_episode_retries})")
        else:
            self.side._count("episodes/rerun", len(sl.indices))
            self.queue.appendleft(sl)

    def _give_up(self, sl: _Slice, reason: str) -> None:
        self.side._count("episodes/lost", len(sl.indices))
        for i in sl.indices:
            self.out[i] = lost_episode(self.specs[i], self.side.cfg.env.id, reason)

    def _kill(self, slot: _Slot, reason: str) -> None:
        """Kill a hung worker; Ray restarts it, and its play call fails (handled as a loss with `reason`)."""
        import ray

        if slot.kill_reason is None:
            self.side._count("workers/hung")
            slot.kill_reason = reason
            ray.kill(slot.actor, no_restart=False)

    def _check_health(self) -> None:
        import ray

        now = time.monotonic()
        for slot in self.side.slots:
            if slot.dead or slot.kill_reason is not None:
                continue
            if slot.starting is not None and now - slot.started_at > self.start_timeout:
                ray.kill(slot.actor, no_restart=False)  # Ray starts it once more, or gives up when restarts are spent
                self.side._lost(slot, f"did not restart within cluster.start_timeout_s={self.start_timeout:g} s")
            elif slot.work is not None and slot.probe is not None and now - slot.probe_sent > self.timeout:
                self._kill(slot, f"worker answered no health check for {now - slot.probe_sent:.1f} s "
                                 f"(cluster.health_timeout_s={self.timeout:g})")
            elif slot.work is not None and slot.probe is None and now - slot.probe_done >= self.timeout / 4:
                slot.probe, slot.probe_sent = _call(slot.actor, "health"), now
