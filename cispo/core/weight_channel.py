"""The weight channel between the learner and the rollout engines: a torch.distributed group of its own.

Rank 0 of the group is the sender (learner rank 0), ranks 1.. are the engines. The group is created from
its own TCPStore, outside the default group the learner's ranks already share for ZeRO (NCCL on GPU, gloo
on CPU: the same protocol). Both sides cut the same ordered list of TensorMeta into the same buckets:
consecutive tensors of one dtype up to `bucket_bytes` each (one larger tensor makes a bucket by itself),
so a bucket is one flat broadcast and neither side ever holds more than one bucket beyond its weights.

Both the learner (cispo.learner) and the engines (rollout) import this module; it imports neither.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 * 2**20

# Set in a driver process that must never hold weight tensors (the multi-node test sets it): any path
# that would pull the learner's weights through the driver raises instead.
DRIVER_REFUSES_WEIGHTS = "CISPO_DRIVER_REFUSES_WEIGHTS"


def refuse_weights_here(what: str) -> None:
    """Raises when this process promised never to hold weight tensors (see DRIVER_REFUSES_WEIGHTS)."""
    if os.environ.get(DRIVER_REFUSES_WEIGHTS) == "1":
        raise RuntimeError(
            f"{what}: weight tensors would pass through the driver ({DRIVER_REFUSES_WEIGHTS}=1)"
        )


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class WeightSource(Protocol):
    """The learner's side of the weight channel, as the rollout side's BroadcastWeightSync drives it (a
    learner whose ranks send the weights themselves: `Learner.weight_source()`). Calls that run on learner
    ranks return Ray refs, so a sync waits on the learner and the engines together."""

    def weight_metas(self) -> list[TensorMeta]: ...
    def weight_group_address(self) -> tuple[str, int]: ...
    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> list[Any]: ...
    def send_weights(self, bucket_bytes: int) -> list[Any]: ...
    def weights_ref(self) -> Any: ...


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


def group_ranks(sizes: list[int]) -> tuple[list[int], int]:
    """(first rank of each engine, world size) for engines holding `sizes` ranks each (a tensor-parallel
    engine: one per process, consecutive); rank 0 is the sender."""
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, 1 + sum(sizes)


def state_dict_metas(state_dict: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [TensorMeta(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int = BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Consecutive same-dtype runs of tensors, each at most ~bucket_bytes (one tensor may exceed it)."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        if not buckets or buckets[-1][0].dtype != meta.dtype or size + meta.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(meta)
        size += meta.nbytes
    return buckets


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def send_bucket(group: Any, tensors: list[torch.Tensor], device: str | torch.device) -> None:
    """Sender side of one bucket: the tensors flattened into one buffer, broadcast from rank 0."""
    broadcast(group, torch.cat([t.detach().to(device).reshape(-1) for t in tensors]))


def broadcast_state_dict(
    group: Any,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device,
    bucket_bytes: int = BUCKET_BYTES,
) -> None:
    """Sender side for a state dict already in memory, bucketed in the order of state_dict_metas."""
    for bucket in plan_buckets(state_dict_metas(state_dict), bucket_bytes):
        send_bucket(group, [state_dict[m.name] for m in bucket], device)


def iter_received(
    group: Any, metas: list[TensorMeta], device: str | torch.device, bucket_bytes: int = BUCKET_BYTES
) -> Iterator[dict[str, torch.Tensor]]:
    """Engine side: one {name: tensor} dict per bucket, as rank 0 broadcasts them (views into the
    bucket's buffer: load each before taking the next to keep one bucket in memory)."""
    for bucket in plan_buckets(metas, bucket_bytes):
        numels = [torch.Size(m.shape).numel() for m in bucket]
        flat = torch.empty(sum(numels), dtype=bucket[0].dtype, device=device)
        broadcast(group, flat)
        yield {m.name: piece.view(m.shape) for m, piece in zip(bucket, torch.split(flat, numels))}


def receive_state_dict(
    group: Any, metas: list[TensorMeta], device: str | torch.device, bucket_bytes: int = BUCKET_BYTES
) -> dict[str, torch.Tensor]:
    """Engine side, all at once (engines that load weights in one call)."""
    out: dict[str, torch.Tensor] = {}
    for part in iter_received(group, metas, device, bucket_bytes):
        out.update(part)
    return out
