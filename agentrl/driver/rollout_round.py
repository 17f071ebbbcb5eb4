"""One `play` on the Ray rollout workers: slices handed out, workers watched, a lost worker's slice played again.

`Round` runs a single call of `RayRolloutSide.play`. Slices (whole groups) wait in a queue; a free
worker takes the next one, one slice at a time per worker, so each worker drains the queue at its
own pace. While slices play, each busy worker is probed (`health`, answered from a thread of its
own) every quarter of `cluster.health_timeout_s`. A worker is killed when a probe goes unanswered for that long (the
process is stuck or frozen) or when it answers that its engine made no progress for that long
with requests in flight (the engine hangs). A killed or dead worker's play call fails; its slice
goes back to the front of the queue for the first free worker (Ray restarts the lost one, and the
driver pushes it the newest weights before it gets work), up to `cluster.max_episode_retries`
times; after that the slice's episodes are recorded as failed (`lost_episode`).

The trainer's thread may push weights while a round runs (the asynchronous schedule), so the round
touches the pool's book (`Slot`s) only under `RayRolloutSide.mutex`, which it lets go while it waits
on Ray; a slice is sent with the version its worker is known to hold, and the worker accepts a newer
one. `RayRolloutSide.abort()` stops the round: no more slices go out, and once the workers' calls
are back `run` raises `PlayAborted`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from agentrl.driver.preflight import first_line
from agentrl.errors import RolloutError
from agentrl.rollout.agent_loop import EpisodeSpec, failed_trajectory
from agentrl.rollout.engine import SamplingParams
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.rollout.workers import METHOD_GROUPS, StaleWeightsError

if TYPE_CHECKING:
    from agentrl.driver.rollout_pool import RayRolloutSide


class PlayAborted(RolloutError):
    """`RayRolloutSide.abort()` ended a play before all of its episodes were played."""


def lost_episode(spec: EpisodeSpec, env_id: str, reason: str) -> Trajectory:
    """The record of an episode no worker could play (its workers were lost): failure class
    `worker_lost`, no tokens, reward 0; counted and never trained on."""
    return failed_trajectory(spec, "worker_lost", reason, env_id)


def plus(*uses: EngineUse, **fixed: float) -> EngineUse:
    """The field-wise sum of `uses`, with the fields in `fixed` set as given."""
    return EngineUse(**{f.name: fixed.get(f.name, sum(getattr(u, f.name) for u in uses)) for f in fields(EngineUse)})


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


def call(actor, method: str, *args, after_restart: bool = False):
    """`actor.method.remote(*args)` in the method's concurrency group.

    A call to a worker that is restarting fails at once (ActorUnavailableError) unless Ray may retry
    it: `after_restart=True` (for idempotent calls: pushing weights, health) makes Ray deliver it once
    the worker is back. Plays are never retried by Ray; the pool decides where a slice runs again.
    """
    retries = {"max_task_retries": -1} if after_restart else {}
    return getattr(actor, method).options(concurrency_group=METHOD_GROUPS[method], **retries).remote(*args)


@dataclass
class Slice:
    indices: list[int]
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Slot:
    """One worker as the driver sees it."""

    index: int
    actor: Any
    version: int | None = 0  # weights it is known to hold (it may hold newer ones); None while restarting
    work: Slice | None = None
    ref: Any = None  # its play call in flight
    starting: Any = None  # a restarted worker's weight push in flight
    starting_version: int = 0  # the version that push carries
    generation: int = 0  # its restarts so far: calls sent to an earlier generation are stale
    started_at: float = 0.0
    probe: Any = None
    probe_sent: float = 0.0
    probe_done: float = 0.0
    kill_reason: str | None = None
    restarts: int = 0
    dead: bool = False


def cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside a Ray error."""
    return getattr(exc, "cause", None) or exc


class Round:
    """One `play` call: hands out slices, watches the workers, plays a lost worker's slice again."""

    def __init__(self, side: RayRolloutSide, specs: list[EpisodeSpec], sampling: SamplingParams, slices: list[Slice]):
        self.side, self.specs, self.sampling = side, specs, sampling
        self.queue = deque(slices)
        self.out: list[Trajectory | None] = [None] * len(specs)
        c = side.cfg.cluster
        self.timeout, self.start_timeout = c.health_timeout_s, c.start_timeout_s
        self.tick = min(1.0, self.timeout / 4)
        self.use: dict[int, EngineUse] = {}  # per worker, over the slices it finished
        self.aborted = False  # set by RayRolloutSide.abort()

    def run(self) -> list[Trajectory]:
        import ray

        mutex = self.side.mutex
        with mutex:
            self.side.round = self
        try:
            while True:
                with mutex:  # let go while waiting: the trainer's thread may push weights meanwhile
                    if not ((self.queue and not self.aborted) or any(s.ref is not None for s in self.side.slots)):
                        break
                    self._hand_out()
                    refs = self._refs()
                if not refs:
                    break
                ray.wait(list(refs), num_returns=1, timeout=self.tick)
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
                with mutex:
                    for ref in ready:
                        self._finished(*refs[ref], ref)
                    self._check_health()
        finally:
            with mutex:
                self.side.round = None
        if self.aborted:
            raise PlayAborted(f"the play was aborted with {len(self.queue)} of its slices not handed out")
        for sl in self.queue:  # every worker is gone for good
            self._give_up(sl, "no rollout worker is left (each used up cluster.max_worker_restarts)")
        self.side.engine.add_round(self.use)
        return self.out  # type: ignore[return-value]

    def _refs(self) -> dict[Any, tuple[str, Slot]]:
        refs: dict[Any, tuple[str, Slot]] = {}
        for slot in self.side.slots:
            if slot.ref is not None:
                refs[slot.ref] = ("play", slot)
            if slot.starting is not None:
                refs[slot.starting] = ("start", slot)
            if slot.probe is not None:
                refs[slot.probe] = ("probe", slot)
        return refs

    def _hand_out(self) -> None:
        """The next slices to the free workers (ready, not restarting), in worker order."""
        for slot in self.side.slots:
            if self.queue and not self.aborted and not slot.dead and slot.work is None and slot.starting is None:
                sl = self.queue.popleft()
                slot.work, slot.probe, slot.probe_done = sl, None, time.monotonic()
                slot.ref = call(slot.actor, "play", [self.specs[i] for i in sl.indices], self.sampling, slot.version)

    def _finished(self, kind: str, slot: Slot, ref) -> None:
        import ray

        if ref != {"play": slot.ref, "start": slot.starting, "probe": slot.probe}[kind]:
            return  # superseded: a newer push to a restarting worker, or a call from before a restart
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
            self.side.restart_push(slot)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug or a setup error in the worker: stop the run with it
            raise cause(exc) from None
        if kind == "probe":
            slot.probe, slot.probe_done = None, time.monotonic()
            if slot.work is not None and value.stalled_s > self.timeout:
                self._kill(slot, f"engine hung: {value.in_flight} request(s) in flight and no progress for "
                                 f"{value.stalled_s:.1f} s (cluster.health_timeout_s={self.timeout:g})")
        elif kind == "start":
            slot.starting, slot.version = None, slot.starting_version
        else:
            trajectories, use = value
            for i, traj in zip(slot.work.indices, trajectories):
                self.out[i] = traj
            self.use[slot.index] = plus(self.use.get(slot.index, EngineUse()), use)
            slot.work = slot.ref = None

    def _worker_lost(self, slot: Slot, reason: str) -> None:
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

    def _give_up(self, sl: Slice, reason: str) -> None:
        self.side._count("episodes/lost", len(sl.indices))
        for i in sl.indices:
            self.out[i] = lost_episode(self.specs[i], self.side.cfg.env.id, reason)

    def _kill(self, slot: Slot, reason: str) -> None:
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
                slot.probe, slot.probe_sent = call(slot.actor, "health"), now
