"""What a run reserves on Ray, per role (cispo/driver/cluster.py), by hand-computed tables, and the start-up
check that stops a run the Ray cluster cannot hold, naming the shortfall per role."""

import pytest

from cispo.core.config import ClusterConfig, TrainConfig
from cispo.driver.cluster import RoleDemand, check_capacity, check_cluster, local_cpu_demand, reservations
from cispo.learner import learner_backend
from tests.unit.test_config import composed, to_train_config


def demand_of(*overrides: str) -> dict[str, tuple[int, float, float]]:
    table = reservations(to_train_config(composed(*overrides)))
    return {d.role: (d.count, d.cpus, d.gpus) for d in table}


def test_the_default_run_reserves_one_rollout_worker_only():
    # The torch learner and the driver run outside Ray actors: they reserve nothing.
    assert demand_of() == {"rollout": (1, 1.0, 0.0)}
    assert demand_of("rollout.backend=local") == {}
    assert local_cpu_demand(to_train_config(composed("rollout.backend=local"))) == 0


EVERY_ROLE = (
    "learner=deepspeed",
    "learner.num_ranks=3",
    "cluster.learner_cpus_per_rank=2",
    "rollout.num_workers=4",
    "rollout.num_cpus_per_worker=1.5",
    "reward.num_actors=2",
    "reward.cpus_per_actor=0.5",
)


def test_every_role_by_hand():
    table = demand_of(*EVERY_ROLE)
    assert table == {"learner": (3, 2.0, 0.0), "rollout": (4, 1.5, 0.0), "reward": (2, 0.5, 0.0)}
    # 3 x 2 + 4 x 1.5 + 2 x 0.5 = 13 CPUs: the size of a local Ray instance for this run.
    cfg = to_train_config(composed(*EVERY_ROLE))
    assert local_cpu_demand(cfg) == 13
    assert local_cpu_demand(to_train_config(composed("rollout.num_cpus_per_worker=0.5"))) == 1  # rounded up


def test_gpus_per_role_on_a_gpu_cluster():
    table = demand_of(
        "learner=deepspeed",
        "learner.num_ranks=2",
        "cluster.gpus_per_node=4",
        "cluster.learner_gpus=2",
        "cluster.rollout_gpus=2",
        "rollout.num_workers=1",
        "rollout.num_gpus_per_worker=2",
    )
    assert table == {"learner": (2, 1.0, 1.0), "rollout": (1, 1.0, 2.0)}


def test_strict_placement_is_recorded_for_the_placement_groups_only():
    cfg = to_train_config(composed("learner=deepspeed", "cluster.placement_strategy=STRICT_PACK",
                                   "reward.num_actors=1"))  # fmt: skip
    flags = {d.role: (d.together, d.apart) for d in reservations(cfg)}
    assert flags == {"learner": (True, False), "rollout": (True, False), "reward": (False, False)}


def two_nodes(cpus: float = 1.0, gpus: float = 0.0) -> list[dict[str, float]]:
    return [{"CPU": cpus, "GPU": gpus}, {"CPU": cpus, "GPU": gpus}]


def test_the_shortfall_names_cpus_per_role():
    table = [
        RoleDemand("learner", 2, 1.0, 0.0, "learner.num_ranks x cluster.learner_cpus_per_rank"),
        RoleDemand("rollout", 1, 1.0, 0.0, "rollout.num_workers x rollout.num_cpus_per_worker"),
    ]
    with pytest.raises(RuntimeError) as err:
        check_capacity(table, {"CPU": 2.0}, two_nodes(), "10.0.0.1:6379")
    message = str(err.value)
    assert message.startswith(
        "the run reserves 3 CPUs (learner 2 x 1, rollout 1 x 1) "
        "but the Ray cluster at 10.0.0.1:6379 has 2 CPUs"
    )
    assert "learner.num_ranks x cluster.learner_cpus_per_rank" in message
    check_capacity(table, {"CPU": 3.0}, [{"CPU": 2.0}, {"CPU": 1.0}], "x")  # exactly enough: no error


def test_gpus_and_what_no_single_node_can_hold():
    rollout = RoleDemand("rollout", 2, 1.0, 2.0, "rollout.num_workers x ...")
    with pytest.raises(RuntimeError, match=r"reserves 4 GPUs \(rollout 2 x 2\) but .* has 2 GPUs"):
        check_capacity([rollout], {"CPU": 8.0, "GPU": 2.0}, two_nodes(4, 1), "c")
    # 4 GPUs in all, but no node has the 2 one worker needs.
    with pytest.raises(RuntimeError, match="each rollout process reserves 2 GPUs .*the largest has 1"):
        check_capacity([rollout], {"CPU": 8.0, "GPU": 4.0}, [{"CPU": 4, "GPU": 1}] * 4, "c")
    big = RoleDemand("reward", 1, 3.0, 0.0, "reward.num_actors x reward.cpus_per_actor")
    with pytest.raises(RuntimeError, match=r"each reward process reserves 3 CPUs .*the largest has 2"):
        check_capacity([big], {"CPU": 4.0}, two_nodes(2), "c")


def test_strict_pack_and_strict_spread_groups():
    packed = RoleDemand("learner", 2, 1.0, 0.0, "k", together=True)
    with pytest.raises(RuntimeError, match="learner group reserves 2 CPUs on one node .*STRICT_PACK"):
        check_capacity([packed], {"CPU": 2.0}, two_nodes(1), "c")
    check_capacity([packed], {"CPU": 3.0}, [{"CPU": 2.0}, {"CPU": 1.0}], "c")
    spread = RoleDemand("rollout", 3, 1.0, 0.0, "k", apart=True)
    with pytest.raises(RuntimeError, match=r"3 rollout processes each on a node .* only 2 node\(s\)"):
        check_capacity([spread], {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}], "c")


def test_check_cluster_reads_the_live_nodes_and_the_totals():
    cfg = TrainConfig(cluster=ClusterConfig(ray_address="10.0.0.1:6379", num_nodes=2))
    cfg.learner.backend, cfg.learner.num_ranks = "deepspeed", 2
    node = {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 1.0}}
    dead = {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}}
    nodes = [node, {**node, "NodeManagerAddress": "10.0.0.2"}, dead]
    with pytest.raises(RuntimeError, match=r"reserves 3 CPUs \(learner 2 x 1, rollout 1 x 1\) but the Ray "
                       r"cluster at 10\.0\.0\.1:6379 has 2 CPUs"):  # fmt: skip
        check_cluster(cfg, nodes, {"CPU": 2.0})
    cfg.rollout.backend = "local"
    check_cluster(cfg, nodes, {"CPU": 2.0})


def test_a_learner_plugin_must_say_where_it_runs():
    assert learner_backend("torch").ray_ranks is False and learner_backend("deepspeed").ray_ranks is True
    with pytest.raises(ValueError, match=r"learner backend 'tests\.unit\.test_cluster_demand:unplaced' .* "
                       r"ray_ranks = False"):  # fmt: skip
        learner_backend("tests.unit.test_cluster_demand:unplaced")
    with pytest.raises(ValueError, match=r"learner\.backend: learner backend .* must say where it runs"):
        to_train_config(composed("learner.backend=tests.unit.test_cluster_demand:unplaced"))


def unplaced(**kwargs):
    """A learner factory that does not declare ray_ranks."""
    raise AssertionError("never built")
