"""Weight sync learner -> rollout workers, kept apart from the workers themselves.

Two paths:
- ObjectStoreWeightSync (CPU, and GPU without NCCL): the learner's state dict goes into the Ray object store
  once (ray.put) and every worker loads the same reference, so N workers cost one serialisation.
- NcclWeightSync (GPU): a process group between learner rank 0 and the engines, created outside the
  default torch.distributed group (the learner may already be inside one for DeepSpeed), over which the
  learner broadcasts flattened buckets of same-dtype tensors. backend="gloo" runs the same protocol on CPU.

Both are versioned: workers stamp every sample with the version of the weights that produced it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cispo.core.weight_channel import (  # noqa: F401 - re-exported: the engines' side of the channel
    BUCKET_BYTES,
    DRIVER_REFUSES_WEIGHTS,
    TensorMeta,
    WeightSource,
    broadcast_state_dict,
    group_ranks,
    init_weight_group,
    iter_received,
    receive_state_dict,
    refuse_weights_here,
    state_dict_metas,
)


def to_cpu_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    refuse_weights_here("object-store weight sync")
    # detach() drops autograd history (not picklable with grads); contiguous() keeps serialisation flat.
    return {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}


class ObjectStoreWeightSync:
    """Push weights through the Ray object store; remembers the latest reference for restarted workers."""

    def __init__(self) -> None:
        self.version = 0
        self.ref: Any = None
        self.last_latency_s = 0.0

    def push(self, workers: list[Any], state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Load `state_dict` as `version` on every worker; returns seconds from call to all loaded."""
        import ray

        start = time.perf_counter()
        self.ref = ray.put(to_cpu_state_dict(state_dict))
        self.version = version
        ray.get([worker.load_weights.remote(self.ref, version) for worker in workers])
        self.last_latency_s = time.perf_counter() - start
        return self.last_latency_s

    def restore(self, worker: Any) -> Any:
        """A pending load of the latest weights on a fresh worker, or None before the first push."""
        return None if self.ref is None else worker.load_weights.remote(self.ref, self.version)


class BroadcastWeightSync:
    """Learner rank 0 -> every engine over the weight channel (cispo/core/weight_channel.py): the driver
    hands out versions and waits; the tensors never pass through it.

    The group spans the sender and the current workers. A restarted worker cannot join a live group: it
    loads the learner's current weights from an object that learner rank 0 put in the object store (the
    driver passes the reference, not the tensors), and the group is rebuilt with it before the next push.
    """

    def __init__(self, source: WeightSource, backend: str = "gloo", bucket_bytes: int = BUCKET_BYTES) -> None:
        self.source, self.backend, self.bucket_bytes = source, backend, bucket_bytes
        self.version = 0
        self.last_latency_s = 0.0
        self._members: list[Any] | None = None
        self._metas: list[TensorMeta] | None = None
        self._ref: Any = None

    def connect(self, workers: list[Any], timeout_s: float) -> None:
        import ray

        host, port = self.source.weight_group_address()
        # A tensor-parallel engine takes as many consecutive ranks as it has processes: offsets add up.
        sizes = ray.get([w.weight_group_size.remote() for w in workers], timeout=timeout_s)
        offsets, world = group_ranks(sizes)
        refs = self.source.join_weight_group(host, port, world, self.backend)
        refs += [
            w.init_weight_group.remote(host, port, o, world, self.backend) for w, o in zip(workers, offsets)
        ]
        ray.get(refs, timeout=timeout_s)
        self._members = list(workers)

    def push(self, workers: list[Any], version: int, timeout_s: float) -> tuple[dict[int, Any], list[Any]]:
        """Starts one broadcast of the learner's weights as `version`: (per-slot loads, the sender's refs)."""
        if (
            self._members is None
            or len(self._members) != len(workers)
            or any(a is not b for a, b in zip(self._members, workers))
        ):
            self.connect(workers, timeout_s)
        if self._metas is None:
            self._metas = self.source.weight_metas()
        loads = {
            slot: w.receive_weights.remote(self._metas, version, self.bucket_bytes)
            for slot, w in enumerate(workers)
        }
        sends = self.source.send_weights(self.bucket_bytes)
        self.version, self._ref = version, None
        return loads, sends

    def broken(self) -> None:
        """A push failed part-way: rebuild the group before the next one."""
        self._members = None

    def restore(self, worker: Any) -> Any:
        """A pending load of the learner's current weights on a fresh worker (None before any push)."""
        if self.version == 0:
            return None
        if self._ref is None:
            self._ref = self.source.weights_ref()
        return worker.load_weights.remote(self._ref, self.version)


class NcclWeightSync:
    """Learner-side broadcaster to RolloutWorker actors (each holding one engine rank).

    GPU path; a worker restarted after the group was formed cannot join it, so on restarts fall back to
    ObjectStoreWeightSync (the manager does) or rebuild the sync.
    """

    def __init__(
        self, workers: list[Any], host: str, port: int, backend: str = "nccl", device: str = "cuda"
    ) -> None:
        import ray

        self.workers = workers
        self.device = device
        world_size = len(workers) + 1
        joins = [
            w.init_weight_group.remote(host, port, i + 1, world_size, backend) for i, w in enumerate(workers)
        ]
        self.group = init_weight_group(host, port, 0, world_size, backend)
        ray.get(joins)
        self.last_latency_s = 0.0

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        import ray

        start = time.perf_counter()
        metas = state_dict_metas(state_dict)
        loads = [w.receive_weights.remote(metas, version) for w in self.workers]
        broadcast_state_dict(self.group, state_dict, self.device)
        ray.get(loads)
        self.last_latency_s = time.perf_counter() - start
        return self.last_latency_s
