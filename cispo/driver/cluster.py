"""What a run reserves on Ray, per role, and the start-up check against what the Ray cluster has.

Ray never says that a request cannot be met: an actor or placement group asking for more CPUs than the
cluster has waits, silently, until a timeout (for a rollout worker, rollout.worker_start_timeout_s). So the
driver compares the whole reservation with the cluster before placing anything, and stops at once naming
the shortfall per role. Reservations:

- learner ranks (a backend on Ray ranks, e.g. deepspeed): learner.num_ranks x
  cluster.learner_cpus_per_rank CPUs, and one GPU each on a GPU cluster (cluster.gpus_per_node > 0);
- rollout workers (rollout.backend=ray): rollout.num_workers x rollout.num_cpus_per_worker CPUs and
  x rollout.num_gpus_per_worker GPUs;
- reward actors: reward.num_actors x reward.cpus_per_actor CPUs.

The in-process torch learner, an in-process engine (rollout.backend=local) and the driver itself reserve
nothing on Ray: the driver is not a Ray actor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cispo.core.config import TrainConfig
from cispo.learner import learner_backend


@dataclass(frozen=True)
class RoleDemand:
    """`count` processes of one role, each reserving `cpus` CPUs and `gpus` GPUs; `keys`: the config keys
    that set them (for messages). `together`: all on one node (a STRICT_PACK placement group); `apart`:
    each on its own node (STRICT_SPREAD)."""

    role: str
    count: int
    cpus: float
    gpus: float
    keys: str
    together: bool = False
    apart: bool = False

    def total(self, resource: str) -> float:
        return self.count * (self.cpus if resource == "CPU" else self.gpus)

    def per_process(self, resource: str) -> float:
        return self.cpus if resource == "CPU" else self.gpus


def reservations(cfg: TrainConfig) -> list[RoleDemand]:
    """Per role, what the run reserves on Ray (see the module docstring); roles that reserve nothing are
    left out. Pure: the config (and the learner backend's declared `ray_ranks`) only."""
    strategy = cfg.cluster.placement_strategy
    grouped = {"together": strategy == "STRICT_PACK", "apart": strategy == "STRICT_SPREAD"}
    out = []
    if learner_backend(cfg.learner.backend).ray_ranks:
        gpus = 1.0 if cfg.cluster.gpus_per_node else 0.0
        keys = "learner.num_ranks x cluster.learner_cpus_per_rank"
        out.append(
            RoleDemand(
                "learner", cfg.learner.num_ranks, cfg.cluster.learner_cpus_per_rank, gpus, keys, **grouped
            )
        )
    r = cfg.rollout
    if r.backend == "ray":
        keys = "rollout.num_workers x rollout.num_cpus_per_worker / num_gpus_per_worker"
        out.append(
            RoleDemand(
                "rollout", r.num_workers, r.num_cpus_per_worker, r.num_gpus_per_worker, keys, **grouped
            )
        )
    if cfg.reward.num_actors > 0:
        keys = "reward.num_actors x reward.cpus_per_actor"
        out.append(RoleDemand("reward", cfg.reward.num_actors, cfg.reward.cpus_per_actor, 0.0, keys))
    return out


def local_cpu_demand(cfg: TrainConfig) -> int:
    """The logical CPUs the Ray actors of this run reserve in all (the size of a local Ray instance)."""
    return math.ceil(sum(d.total("CPU") for d in reservations(cfg)) - 1e-9)


def _n(x: float) -> str:
    return f"{x:g}"


def _plural(resource: str, amount: float) -> str:
    return f"{_n(amount)} {resource}{'' if amount == 1 else 's'}"


def check_capacity(
    demands: Sequence[RoleDemand],
    totals: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    where: str,
) -> None:
    """RuntimeError naming the shortfall when `demands` cannot be placed on a cluster of `totals` (Ray's
    cluster_resources()) and live `nodes` (each node's resources). Only necessary conditions are checked
    (the sums, each process on some node, a STRICT_PACK group on one node, a STRICT_SPREAD group on as
    many nodes), so a run this passes may still wait, but one it stops could never have been placed."""
    for resource in ("CPU", "GPU"):
        need = [d for d in demands if d.total(resource) > 0]
        wanted = sum(d.total(resource) for d in need)
        have = float(totals.get(resource, 0.0))
        if wanted > have + 1e-9:
            parts = ", ".join(f"{d.role} {d.count} x {_n(d.per_process(resource))}" for d in need)
            keys = "; ".join(f"{d.role}: {d.keys}" for d in need)
            raise RuntimeError(
                f"the run reserves {_plural(resource, wanted)} ({parts}) but the Ray cluster at {where} has "
                f"{_plural(resource, have)}: lower the reservations ({keys}) or add nodes"
            )
        largest = max((float(n.get(resource, 0.0)) for n in nodes), default=0.0)
        for d in need:
            each = d.per_process(resource)
            if each > largest + 1e-9:
                raise RuntimeError(
                    f"each {d.role} process reserves {_plural(resource, each)} ({d.keys}) but no node of the "
                    f"Ray cluster at {where} has that many (the largest has {_n(largest)})"
                )
            if d.together and d.total(resource) > largest + 1e-9:
                raise RuntimeError(
                    f"the {d.role} group reserves {_plural(resource, d.total(resource))} on one node "
                    f"(cluster.placement_strategy=STRICT_PACK; {d.keys}) but no node of the Ray cluster "
                    f"at {where} has that many (the largest has {_n(largest)})"
                )
            fitting = sum(1 for n in nodes if float(n.get(resource, 0.0)) >= each - 1e-9)
            if d.apart and d.count > fitting:
                raise RuntimeError(
                    f"{d.count} {d.role} processes each on a node of their own "
                    f"(cluster.placement_strategy=STRICT_SPREAD) but only {fitting} node(s) of the Ray "
                    f"cluster at {where} have {_plural(resource, each)}"
                )


def check_cluster(cfg: TrainConfig, nodes: list[dict[str, Any]], totals: Mapping[str, float]) -> None:
    """A Ray cluster must have the nodes and GPUs the cluster config says it has, and the CPUs and GPUs
    the run reserves (`nodes`: ray.nodes(); `totals`: ray.cluster_resources())."""
    where = cfg.cluster.ray_address or "(the local instance)"
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) < cfg.cluster.num_nodes:
        raise RuntimeError(
            f"cluster.num_nodes={cfg.cluster.num_nodes} but the Ray cluster at {where} "
            f"has {len(alive)} live node(s)"
        )
    short = [
        n["NodeManagerAddress"] for n in alive if n["Resources"].get("GPU", 0) < cfg.cluster.gpus_per_node
    ]
    if len(alive) - len(short) < cfg.cluster.num_nodes:
        raise RuntimeError(
            f"cluster.gpus_per_node={cfg.cluster.gpus_per_node}, but these nodes have fewer GPUs: {short}"
        )
    check_capacity(reservations(cfg), totals, [n["Resources"] for n in alive], where)
