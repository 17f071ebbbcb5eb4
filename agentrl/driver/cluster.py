"""Ray for one run: start (or join) a cluster, check it holds what `cluster.*` asks for, place the workers.

Placement is by Ray placement groups, one bundle per worker, reserved before any worker starts so a
run that cannot fit fails at once with the numbers instead of waiting forever for resources:

- rollout workers: one group, strategy SPREAD (engine replicas are independent; spreading them uses
  every node's devices and keeps one lost node from taking all of them);
- trainer ranks: one group, strategy PACK (FSDP2's all-gathers and reduce-scatters are cheapest
  within a node);
- colocated (`cluster.colocate` with trainer_workers > 1): one PACK group whose bundle i holds
  rollout worker i and trainer rank i together (both their CPUs, and the GPU they share: each asks
  half of it, so Ray hands both the same device). STRICT_PACK would pin a colocated run to one node;
  sharing a device needs only each pair in one bundle, which PACK keeps.

On CPU the bundles are CPUs only; Ray's CPU counts are logical, so a test can place four workers on
two cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentrl.config import ClusterConfig
from agentrl.errors import ConfigError


@dataclass(frozen=True)
class Bundle:
    """Where one worker goes: a placement group, a bundle of it, and the resources the worker asks for."""

    group: Any
    index: int
    num_cpus: float
    num_gpus: float

    def options(self) -> dict[str, Any]:
        """Ray actor options that put the worker in this bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "scheduling_strategy":
                PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=self.index)}


@dataclass(frozen=True)
class Placement:
    """One bundle per rollout worker and per trainer rank (none when the trainer runs in the driver)."""

    rollout: list[Bundle]
    trainer: list[Bundle]


def _bundles(c: ClusterConfig) -> list[tuple[str, str, list[dict[str, float]]]]:
    """(role, strategy, bundles) of each placement group the run needs."""
    def res(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    trainer_in_ray = c.trainer_workers > 1
    if c.colocate and trainer_in_ray:
        pair = res(c.cpus_per_rollout_worker + c.cpus_per_trainer_worker, c.gpus_per_rollout_worker)
        return [("colocated", "PACK", [pair] * c.rollout_workers)]
    groups = [("rollout", "SPREAD", [res(c.cpus_per_rollout_worker, c.gpus_per_rollout_worker)] * c.rollout_workers)]
    if trainer_in_ray:
        groups.append(("trainer", "PACK", [res(c.cpus_per_trainer_worker, c.gpus_per_trainer_worker)]
                       * c.trainer_workers))
    return groups


def check_resources(c: ClusterConfig, nodes: list[dict[str, float]]) -> None:
    """Refuse a config the cluster cannot hold: too few CPUs or GPUs in all, or a bundle no node fits.

    Args:
        c: The cluster section.
        nodes: Each live node's total resources (`ray.nodes()[i]["Resources"]`).
    """
    groups = _bundles(c)
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0.0) for _, _, bundles in groups for b in bundles)
        have = sum(n.get(kind, 0.0) for n in nodes)
        if need > have:
            parts = ", ".join(f"{len(bundles)} {role} bundle(s) of {bundles[0].get(kind, 0.0):g}"
                              for role, _, bundles in groups)
            raise ConfigError(f"the Ray cluster has {have:g} {kind}s in all ({len(nodes)} node(s)) but the run asks "
                              f"for {need:g} ({parts}); lower cluster.rollout_workers / trainer_workers or the "
                              f"{kind.lower()}s per worker, or add nodes")
    for role, _, bundles in groups:
        b = bundles[0]
        if not any(all(n.get(k, 0.0) >= v for k, v in b.items()) for n in nodes):
            raise ConfigError(f"no node of the Ray cluster can hold one {role} worker ({b}); the largest node has "
                              f"{max((n.get('CPU', 0.0) for n in nodes), default=0):g} CPUs and "
                              f"{max((n.get('GPU', 0.0) for n in nodes), default=0):g} GPUs")


@dataclass
class RaySession:
    """The Ray connection of a run and the placement groups it reserved; `close` gives them back.

    A Ray already initialised by the caller (a notebook, a test module sharing one Ray) is used and
    left running; one this session started is shut down at close, with every worker it started.
    """

    started: bool
    groups: list[Any] = field(default_factory=list)

    @classmethod
    def open(cls, c: ClusterConfig) -> RaySession:
        import ray

        if ray.is_initialized():
            return cls(started=False)
        options: dict[str, Any] = {"include_dashboard": False}
        if c.address is not None:
            options["address"] = c.address
        else:
            # "local" starts a private Ray even where another one runs on this machine (plain ray.init()
            # would join the newest cluster started here, e.g. by `ray start` or another run).
            options["address"] = "local"
            if c.num_cpus is not None:
                options["num_cpus"] = c.num_cpus
        try:
            ray.init(**options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f"join the Ray cluster at cluster.address={c.address!r}" if c.address else "start Ray"
            raise ConfigError(f"cannot {where}: {' '.join(str(exc).split())[:300]}") from None
        return cls(started=True)

    def place(self, c: ClusterConfig) -> Placement:
        """Reserve a bundle per worker (waiting at most cluster.start_timeout_s for the cluster to grant them)."""
        import ray
        from ray.util.placement_group import placement_group

        check_resources(c, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        placed: dict[str, list[Bundle]] = {"rollout": [], "trainer": []}
        for role, strategy, bundles in _bundles(c):
            group = placement_group(bundles, strategy=strategy, name="")
            self.groups.append(group)
            ready, _ = ray.wait([group.ready()], timeout=c.start_timeout_s)
            if not ready:
                raise ConfigError(f"Ray did not grant the {role} workers' resources ({len(bundles)} x {bundles[0]}) "
                                  f"within cluster.start_timeout_s={c.start_timeout_s:g}; other jobs may hold them "
                                  "(`ray status` shows what is in use)")
            for i in range(len(bundles)):
                if role == "colocated":  # each of the pair asks half the shared GPU, so both land on it
                    gpu = c.gpus_per_rollout_worker / 2
                    placed["rollout"].append(Bundle(group, i, c.cpus_per_rollout_worker, gpu))
                    placed["trainer"].append(Bundle(group, i, c.cpus_per_trainer_worker, gpu))
                else:
                    cpus, gpus = (getattr(c, f"cpus_per_{role}_worker"), getattr(c, f"gpus_per_{role}_worker"))
                    placed[role].append(Bundle(group, i, cpus, gpus))
        return Placement(placed["rollout"], placed["trainer"])

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - closing: a group Ray already dropped is fine
                pass
        self.groups.clear()
        if self.started:
            ray.shutdown()
