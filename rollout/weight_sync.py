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

import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_BUCKET_BYTES = 256 * 2**20


def to_cpu_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def init_weight_group(
    host: str, port: int, rank: int, world_size: int, backend: str = "nccl", timeout_s: float = 600.0
) -> Any:
    """A standalone process group (not the default one): rank 0 is the learner, ranks 1.. are engines."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    prefix = dist.PrefixStore("cispo_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError(
                "weight sync: this torch build has no NCCL (use backend='gloo' or the object store)"
            )
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, world_size, options)
    raise ValueError(f"weight sync: unknown backend {backend!r}; known: gloo, nccl")


def state_dict_metas(state_dict: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [TensorMeta(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]


def _buckets(metas: list[TensorMeta]) -> list[list[TensorMeta]]:
    """Consecutive same-dtype runs of tensors, each at most ~_BUCKET_BYTES (one tensor may exceed it)."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        nbytes = torch.Size(meta.shape).numel() * meta.dtype.itemsize
        if not buckets or buckets[-1][0].dtype != meta.dtype or size + nbytes > _BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(meta)
        size += nbytes
    return buckets


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def broadcast_state_dict(group: Any, state_dict: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """Learner side (rank 0): send every tensor, bucketed in the order of state_dict_metas."""
    for bucket in _buckets(state_dict_metas(state_dict)):
        flat = torch.cat([state_dict[m.name].detach().to(device).reshape(-1) for m in bucket])
        _broadcast(group, flat)


def receive_state_dict(
    group: Any, metas: list[TensorMeta], device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Engine side: receive the tensors rank 0 broadcasts for `metas`."""
    out: dict[str, torch.Tensor] = {}
    for bucket in _buckets(metas):
        numels = [torch.Size(m.shape).numel() for m in bucket]
        flat = torch.empty(sum(numels), dtype=bucket[0].dtype, device=device)
        _broadcast(group, flat)
        for meta, piece in zip(bucket, torch.split(flat, numels)):
            out[meta.name] = piece.view(meta.shape)
    return out


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
