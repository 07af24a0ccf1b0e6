"""How weights leave a DeepSpeed rank: the weight channel, an object-store copy, HF safetensors on disk.

Every way walks the policy's state dict in order and in buckets (cispo/core/weight_channel.py's plan).
Under ZeRO-3 each bucket's parameters are gathered on every rank together (GatheredParameters is a
collective) and released before the next bucket, so a rank holds at most one extra bucket; only rank 0
does anything with the gathered tensors. Under ZeRO-2 every rank already holds the full parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cispo.core.weight_channel import BUCKET_BYTES, TensorMeta, init_weight_group, plan_buckets, send_bucket
from cispo.learner.hf_export import HfShards, finish_hf_dir, start_hf_dir


class RankWeights:
    def __init__(self, policy: nn.Module, rank: int) -> None:
        self.rank = rank
        params = dict(policy.named_parameters(remove_duplicate=False))
        buffers = dict(policy.named_buffers(remove_duplicate=False))
        self.tensors: dict[str, Tensor] = {}
        for name in policy.state_dict(keep_vars=True):
            tensor = params.get(name, buffers.get(name))
            if tensor is not None:
                self.tensors[name] = tensor
        self.group: Any = None

    def metas(self) -> list[TensorMeta]:
        """Full (unpartitioned) shapes, in state-dict order: what the engines' side plans buckets from."""
        return [
            TensorMeta(n, tuple(getattr(t, "ds_shape", t.shape)), t.dtype) for n, t in self.tensors.items()
        ]

    def _gathered(self, bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
        """Bucket by bucket, (name, full tensor) pairs valid until the next bucket (ranks > 0: the same
        collectives, and the pairs are theirs to ignore)."""
        import deepspeed

        for bucket in plan_buckets(self.metas(), bucket_bytes):
            tensors = [self.tensors[m.name] for m in bucket]
            partitioned = list({id(t): t for t in tensors if hasattr(t, "ds_id")}.values())
            with deepspeed.zero.GatheredParameters(
                partitioned, modifier_rank=None, enabled=bool(partitioned)
            ):
                yield [(m.name, t) for m, t in zip(bucket, tensors)]

    def join(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight channel as its sender (a new group replaces an old one)."""
        if self.rank == 0:
            self.group = init_weight_group(host, port, 0, world_size, backend)

    def send(self, bucket_bytes: int, device: torch.device) -> None:
        if self.rank == 0 and self.group is None:
            raise RuntimeError("learner rank 0 has no weight group: join_weight_group first")
        channel_device = device if device.type == "cuda" else torch.device("cpu")
        for pairs in self._gathered(bucket_bytes):
            if self.rank == 0:
                send_bucket(self.group, [t for _, t in pairs], channel_device)

    def full_state(self, bucket_bytes: int = BUCKET_BYTES) -> dict[str, Tensor] | None:
        """Rank 0: every tensor gathered and copied to CPU; other ranks: None (they take part in gathers)."""
        out: dict[str, Tensor] = {}
        for pairs in self._gathered(bucket_bytes):
            if self.rank == 0:
                out.update((name, t.detach().cpu().clone()) for name, t in pairs)
        return out if self.rank == 0 else None

    def put_in_object_store(self) -> list:
        """[ObjectRef] of the full state on rank 0 ([] elsewhere): a restarted engine loads it; the driver
        holds only the reference (a list, so Ray does not resolve it on the way)."""
        import ray

        state = self.full_state()
        return [ray.put(state)] if state is not None else []

    def save_hf(
        self, template_dir: str, out_dir: str, shard_bytes: int, files: Mapping[str, str] | None = None
    ) -> None:
        """Rank 0 writes `out_dir` in Hugging Face format (cispo/learner/hf_export.py): `template_dir`'s
        config and tokenizer files, the weights in shards of about shard_bytes, `files`; written to a
        sibling and renamed into place. A tensor tied to an earlier one is written once. Every rank takes
        part in the gathers."""
        tmp = start_hf_dir(template_dir, out_dir) if self.rank == 0 else None
        seen: set[int] = set()
        shards = HfShards(shard_bytes)
        for pairs in self._gathered(shard_bytes):
            for name, tensor in pairs:
                key = id(self.tensors[name])
                if self.rank != 0 or key in seen:
                    continue
                seen.add(key)
                shards.add(name, tensor)
        if tmp is not None:
            finish_hf_dir(tmp, out_dir, shards, files)
