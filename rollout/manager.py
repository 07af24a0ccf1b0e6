"""Rollout managers: turn prompt groups into samples, on Ray workers or in-process.

RolloutManager shards prompt groups across RolloutWorker actors (whole groups per shard, contiguous, so
results come back in input order and a group's samples share a length bucket), gathers the results, and
restarts a worker that dies, resubmitting its shard: a shard's result is taken exactly once, so no sample is
lost or duplicated. LocalRolloutManager has the same interface with the engine in this process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from cispo.core.types import Generation, PromptGroup, Sample, SamplingParams
from rollout.engine import build_engine
from rollout.weight_sync import ObjectStoreWeightSync
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


def expand_groups(groups: list[PromptGroup]) -> list[list[int]]:
    """One prompt per requested sample: group g's prompt repeated g.group_size times, groups in order."""
    return [list(g.prompt_ids) for g in groups for _ in range(g.group_size)]


def build_samples(groups: list[PromptGroup], generations: list[Generation]) -> list[Sample]:
    expected = sum(g.group_size for g in groups)
    if len(generations) != expected:
        raise RuntimeError(f"rollout: {len(generations)} generations for {expected} requested samples")
    samples: list[Sample] = []
    it = iter(generations)
    for group in groups:
        for _ in range(group.group_size):
            gen = next(it)
            samples.append(
                Sample(
                    group_index=group.index,
                    prompt_ids=list(group.prompt_ids),
                    response_ids=list(gen.response_ids),
                    behaviour_logprobs=list(gen.logprobs),
                    finish_reason=gen.finish_reason,
                    policy_version=gen.policy_version,
                    prompt_text=group.prompt_text,
                    reference=group.reference,
                    metadata=dict(group.metadata),
                    routed_experts=gen.routed_experts,
                )
            )
    return samples


def shard_groups(groups: list[PromptGroup], num_shards: int) -> list[list[PromptGroup]]:
    """Contiguous runs of whole groups with about the same number of samples each (empty shards dropped)."""
    total = sum(g.group_size for g in groups)
    shards: list[list[PromptGroup]] = [[] for _ in range(max(1, num_shards))]
    done = 0
    for group in groups:
        shard = min(len(shards) - 1, done * len(shards) // max(total, 1))
        shards[shard].append(group)
        done += group.group_size
    return [s for s in shards if s]


def generation_timings(start: float, samples: list[Sample]) -> dict[str, float]:
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(s.response_ids) for s in samples)
    rate = new_tokens / max(elapsed, 1e-9)
    return {"generate_s": elapsed, "new_tokens": float(new_tokens), "tokens_per_s": rate}


class LocalRolloutManager:
    """The manager interface with the engine in this process: for unit tests, debugging and 1-CPU runs."""

    def __init__(self, engine_name: str, engine_kwargs: dict[str, Any], **_resources: Any) -> None:
        self.engine = build_engine(engine_name, **engine_kwargs)
        self.last_timings: dict[str, float] = {}

    @property
    def version(self) -> int:
        return self.engine.version

    def generate(self, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
        start = time.perf_counter()
        samples = build_samples(groups, self.engine.generate(expand_groups(groups), params))
        self.last_timings = {**generation_timings(start, samples), "restarts": 0.0}
        return samples

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        start = time.perf_counter()
        self.engine.load_weights(state_dict, version)
        latency = time.perf_counter() - start
        self.last_timings["weight_sync_s"] = latency
        log.debug("weight sync to version %d: %.3f s (in-process)", version, latency)
        return latency

    def shutdown(self) -> None:
        return None


class RolloutManager:
    """N RolloutWorker actors behind one generate() call.

    The caller owns ray.init; when Ray is not initialised yet the manager starts a small local instance.
    """

    def __init__(
        self,
        engine_name: str,
        engine_kwargs: dict[str, Any],
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        max_restarts: int = 2,
        num_threads_per_worker: int | None = None,
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False)
        self.engine_name = engine_name
        self.engine_kwargs = engine_kwargs
        self.max_restarts = max_restarts
        self.num_threads = num_threads_per_worker or max(1, int(num_cpus_per_worker))
        # Restarts are ours, not Ray's: a restarted actor must also get the latest weights back.
        self._actor_cls = ray.remote(RolloutWorker).options(
            num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0
        )
        self._sync = ObjectStoreWeightSync()
        self.restarts = [0] * num_workers
        self.workers = [self._start_worker() for _ in range(num_workers)]
        ray.get([w.ready.remote() for w in self.workers])
        self.version = 0
        self.last_timings: dict[str, float] = {}

    def _start_worker(self) -> Any:
        return self._actor_cls.remote(self.engine_name, self.engine_kwargs, self.num_threads)

    def _restart(self, slot: int) -> None:
        import ray

        self.restarts[slot] += 1
        if self.restarts[slot] > self.max_restarts:
            raise RuntimeError(f"rollout worker {slot} died more than max_restarts={self.max_restarts} times")
        log.warning("rollout worker %d died; restarting (restart %d)", slot, self.restarts[slot])
        ray.kill(self.workers[slot], no_restart=True)
        worker = self._start_worker()
        pending_load = self._sync.restore(worker)
        ray.get(pending_load if pending_load is not None else worker.ready.remote())
        self.workers[slot] = worker

    def generate(self, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
        import ray
        from ray.exceptions import RayActorError

        start = time.perf_counter()
        shards = shard_groups(groups, len(self.workers))
        results: dict[int, list[Generation]] = {}
        worker_timings: list[dict[str, float]] = []
        pending = {self._submit(i, shards[i], params): i for i in range(len(shards))}
        restarts_before = sum(self.restarts)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            try:
                generations, timings = ray.get(ready[0])
            except RayActorError:
                self._restart(shard)
                pending[self._submit(shard, shards[shard], params)] = shard
                continue
            results[shard] = generations
            worker_timings.append(timings)
        generations = [g for i in range(len(shards)) for g in results[i]]
        samples = build_samples(groups, generations)
        self._record(start, samples, worker_timings, sum(self.restarts) - restarts_before)
        return samples

    def _submit(self, slot: int, shard: list[PromptGroup], params: SamplingParams) -> Any:
        # Shard i always runs on worker slot i, so a failure names the slot to restart.
        return self.workers[slot].generate.remote(expand_groups(shard), params)

    def _record(
        self, start: float, samples: list[Sample], worker: list[dict[str, float]], restarts: int
    ) -> None:
        self.last_timings = {
            **generation_timings(start, samples),
            "worker_generate_s_max": max((t.get("generate_s", 0.0) for t in worker), default=0.0),
            "restarts": float(restarts),
            "weight_sync_s": self._sync.last_latency_s,
        }

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Send new weights to every worker through the object store; returns the sync latency in seconds."""
        from ray.exceptions import RayActorError

        try:
            latency = self._sync.push(self.workers, state_dict, version)
        except RayActorError:
            # A dead worker is restarted from the reference just stored, so it comes back at this version.
            for slot in self._dead_slots():
                self._restart(slot)
            latency = self._sync.push(self.workers, state_dict, version)
        self.version = version
        self.last_timings["weight_sync_s"] = latency
        log.debug("weight sync to version %d: %.3f s (%d workers)", version, latency, len(self.workers))
        return latency

    def _dead_slots(self) -> list[int]:
        import ray
        from ray.exceptions import RayActorError

        dead = []
        for slot, worker in enumerate(self.workers):
            try:
                ray.get(worker.ready.remote(), timeout=30)
            except RayActorError:
                dead.append(slot)
        return dead

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
