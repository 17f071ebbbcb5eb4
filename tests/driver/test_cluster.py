"""Placement: resources checked against the cluster before anything starts, and on a simulated two-node
Ray cluster (`ray.cluster_utils.Cluster`: two raylets on this machine) the rollout workers land on both."""

from __future__ import annotations

import pytest

from agentrl.config import ClusterConfig, load_config
from agentrl.driver.cluster import RaySession, check_resources
from agentrl.driver.rollout_pool import RayRolloutSide
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EpisodeSpec


def _cluster(**kw) -> ClusterConfig:
    return ClusterConfig(mode="ray", **kw)


def test_too_few_cpus_in_all_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"has 3 CPUs in all \(2 node\(s\)\) but the run asks for 4 \(2 rollout "
                                          r"bundle\(s\) of 1, 2 trainer bundle\(s\) of 1\)"):
        check_resources(_cluster(rollout_workers=2, trainer_workers=2), [{"CPU": 2.0}, {"CPU": 1.0}])


def test_a_worker_no_node_can_hold_is_refused():
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match=r"no node of the Ray cluster can hold one rollout worker"):
        check_resources(_cluster(gpus_per_rollout_worker=2), nodes)
    check_resources(_cluster(rollout_workers=2, gpus_per_rollout_worker=1), nodes)  # fits: one per node


def test_colocated_pairs_share_one_bundle():
    c = _cluster(rollout_workers=2, trainer_workers=2, colocate=True, cpus_per_trainer_worker=2)
    check_resources(c, [{"CPU": 3.0}, {"CPU": 3.0}])  # each pair: 1 + 2 CPUs on one node
    with pytest.raises(ConfigError, match="no node of the Ray cluster can hold one colocated worker"):
        check_resources(c, [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}])  # 6 CPUs in all, but no node fits a pair


def test_config_refuses_what_ray_workers_do_not_run():
    base = ["model.path=m", "env.id=calculator-v0"]
    for extra, match in [(["cluster.rollout_workers=2"], "needs Ray workers: set cluster.mode=ray"),
                         (["cluster.mode=ray", "model.device=cuda:1"], "write model.device=cuda"),
                         (["cluster.mode=ray", "model.device=cuda"], "give each rollout worker a GPU"),
                         (["cluster.mode=ray", "cluster.gpus_per_rollout_worker=1"], "but model.device=cpu"),
                         (["cluster.mode=ray", "cluster.trainer_workers=2", "algorithm.kl_coef=0.1"], "not built"),
                         (["cluster.mode=ray", "cluster.rollout_workers=2", "cluster.trainer_workers=3",
                           "cluster.colocate=true"], "must equal trainer_workers"),
                         (["cluster.colocate=true", "train.schedule=asynchronous", "algorithm.old_logprobs=recompute",
                           "algorithm.tis=token"], "use one or the other"),
                         (["cluster.mode=ray", "train.schedule=asynchronous", "algorithm.old_logprobs=recompute",
                           "algorithm.tis=token"], "not built")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, base + extra)


@pytest.fixture()
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=2, resources={"node_b": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_rollout_workers_spread_over_two_nodes(two_nodes, stopping_model_dir):
    import ray

    cfg = load_config(None, [f"model.path={stopping_model_dir}", "env.id=calculator-v0", "cluster.mode=ray",
                             "cluster.rollout_workers=2", "rollout.max_tokens_per_turn=16", "rollout.max_turns=1",
                             "rollout.max_total_tokens=256"])
    session = RaySession.open(cfg.cluster)
    assert not session.started  # the caller's Ray is used, and left running
    side = RayRolloutSide.open(cfg, session.place(cfg.cluster).rollout, [("train", "env.train_split")])
    try:
        # Each node could hold both workers (2 CPUs each); SPREAD puts one on each.
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and sorted(side.node_ids) == sorted(nodes)
        assert {"node_a", "node_b"} == {r for nid in side.node_ids for r in nodes[nid] if r.startswith("node_")}
        trajs = side.play([EpisodeSpec(seed=s, group_id=s) for s in range(4)], 1.0, seed=3)
        assert all(t.error is None and t.num_model_tokens > 0 for t in trajs)
    finally:
        side.close()
        session.close()
