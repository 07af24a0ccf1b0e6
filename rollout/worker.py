"""RolloutWorker: one inference engine inside one Ray actor.

The class is plain Python (wrapped with ray.remote by the manager) so it can also be driven in-process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from cispo.core.types import Generation, SamplingParams
from rollout.engine import build_engine
from rollout.weight_sync import BUCKET_BYTES, TensorMeta, init_weight_group, iter_received


class RolloutWorker:
    def __init__(
        self, engine_name: str, engine_kwargs: dict[str, Any], num_threads: int | None = None
    ) -> None:
        if num_threads is not None:
            # Every process on a small box otherwise grabs all cores and they thrash each other.
            torch.set_num_threads(num_threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # only settable before the first parallel op in this process
                pass
        self.engine = build_engine(engine_name, **engine_kwargs)
        self._group: Any = None

    def ready(self) -> int:
        return os.getpid()

    def generate(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[Generation], dict[str, float]]:
        generations = self.engine.generate(prompts, params)
        return generations, dict(self.engine.last_timings)

    def run_task(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        weights: dict[str, torch.Tensor] | None,
        version: int,
    ) -> tuple[list[Generation], dict[str, float]]:
        """Loads `weights` as `version` first when given, then generates: one call, so a task never runs
        on weights other than those it asked for (a failed load fails the task)."""
        load_s = self.load_weights(weights, version) if weights is not None else 0.0
        generations, timings = self.generate(prompts, params)
        return generations, {**timings, "load_s": load_s}

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        start = time.perf_counter()
        self.engine.load_weights(state_dict, version)
        return time.perf_counter() - start

    def version(self) -> int:
        return self.engine.version

    # The broadcast path: engines that receive inside their own processes (vllm) implement these themselves.
    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        if hasattr(self.engine, "init_weight_group"):
            self.engine.init_weight_group(host, port, rank, world_size, backend)
        else:
            self._group = init_weight_group(host, port, rank, world_size, backend)

    def weight_group_size(self) -> int:
        """Ranks this worker takes in the weight group (a tensor-parallel engine: one per process)."""
        return int(getattr(self.engine, "weight_group_size", 1))

    def receive_weights(
        self, metas: list[TensorMeta], version: int, bucket_bytes: int = BUCKET_BYTES
    ) -> float:
        """One broadcast from learner rank 0, loaded bucket by bucket (one bucket of extra memory)."""
        start = time.perf_counter()
        if hasattr(self.engine, "receive_weights"):
            self.engine.receive_weights(metas, version, bucket_bytes)
        else:
            device = getattr(self.engine, "device", "cpu")
            for part in iter_received(self._group, metas, device, bucket_bytes):
                self.engine.load_weights(part, version)
        return time.perf_counter() - start

    def node(self) -> dict[str, Any]:
        """Where this worker runs (for placement.json)."""
        import ray

        context = ray.get_runtime_context()
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
        }
