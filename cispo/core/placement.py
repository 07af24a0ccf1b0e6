"""Ray placement groups for the processes a run places on the cluster (learner ranks, rollout workers).

One bundle per process; `strategy` (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) lays them over the nodes.
A group that cannot be placed within the timeout is removed and reported with the cluster's resources,
naming what asked for it, instead of leaving its actors pending forever.
"""

from __future__ import annotations

from typing import Any, TypedDict

# One process of a run, as placement.json lists it: its role ("driver", "learner", "rollout", ...), its
# rank (learner) or slot (rollout), and where it runs: on a Ray node (node_ip, node_id, pid, gpus) or
# "in" another process ("driver"). Every key but role is optional. ("in" is a keyword: the functional form.)
PlacementEntry = TypedDict(
    "PlacementEntry",
    {
        "role": str,
        "rank": int,
        "slot": int,
        "in": str,
        "node_ip": str,
        "node_id": str,
        "pid": int,
        "gpus": list[str],
        "built_partitioned": bool,
    },
    total=False,
)


def make_placement_group(
    what: str, count: int, cpus: float, gpus: float, strategy: str, timeout_s: float
) -> Any:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"{what} placement: {count} bundles of {bundle} with strategy {strategy} did not fit the Ray "
            f"cluster within {timeout_s:g} s (resources: {ray.cluster_resources()})"
        )
    return group


def in_bundle(group: Any, index: int) -> Any:
    """The scheduling strategy that puts an actor in bundle `index` of `group`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
