"""Rollout managers: turn prompt groups into samples, on Ray workers or in-process.

RolloutManager shards prompt groups across RolloutWorker actors (whole groups per shard, contiguous, so
results come back in input order and a group's samples share a length bucket), gathers the results, and
restarts a worker that dies, resubmitting its shard: a shard's result is taken exactly once, so no sample is
lost or duplicated. LocalRolloutManager has the same interface with the engine in this process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Any

import torch

from cispo.core.placement import in_bundle, make_placement_group
from cispo.core.types import Generation, PromptGroup, Sample, SamplingParams
from rollout.engine import build_engine
from rollout.stall import AUTO, StallTimeout
from rollout.weight_sync import BroadcastWeightSync, ObjectStoreWeightSync, to_cpu_state_dict
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)

# in-flight generate call -> (shard, deadline, submitted at, how the deadline was chosen)
Pending = dict[Any, tuple[int, float, float, str]]


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


def slot_params(params: SamplingParams, slot: int) -> SamplingParams:
    """A seeded request's seed for worker slot `slot`: distinct streams per worker, reproducible per call."""
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed * 1_000_003 + slot) % 2**63)


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
        no_events = dict.fromkeys(("restarts", "timeouts", "restarts_total", "timeouts_total"), 0.0)
        self.last_timings = {**generation_timings(start, samples), **no_events}
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
    """N RolloutWorker actors behind one generate() call, each in a numbered slot, none allowed to hang it.

    Every wait on a worker is bounded. A generate shard gets `worker_timeout_s` from its submission (0, the
    default: derived from the shard's budget and the decode speed measured on recent shards, see
    rollout.stall), a weight load `worker_timeout_s` (0: `start_timeout_s`), a fresh worker
    `start_timeout_s` to come up with the latest weights. A
    worker that dies, or does not answer in time (frozen: SIGSTOP, a hung kernel), is killed (ray.kill; Ray
    also SIGKILLs a stopped process), restarted with the latest weights, and its shard resubmitted to the
    same slot with the same slot seed (`slot_params`): a seeded request samples what the lost worker would
    have, and a shard's result is taken exactly once.

    The restart budget is per slot and per sliding window: a slot may restart `max_restarts` times within
    any `restart_window_s` seconds (0: within the whole run); one more restart stops the run with a
    RuntimeError naming the slot, the budget and the last failure. A window rather than a per-run count:
    a long run sees occasional deaths (a preempted node, a transient OOM) that a per-run budget of a few
    would turn into a dead run after days, while a crash loop (a worker that dies on every shard) still
    spends its budget within minutes. Failed restarts count too.

    `last_timings` after generate(): generate_s, new_tokens, tokens_per_s, worker_generate_s_max,
    weight_sync_s; `restarts` and `timeouts` since the previous generate() (so those during a weight sync
    show up once, in the next generate); `restarts_total` and `timeouts_total` over the manager's life.

    The caller owns ray.init; when Ray is not initialised yet the manager starts a small local instance.
    """

    def __init__(
        self,
        engine_name: str,
        engine_kwargs: dict[str, Any],
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        max_restarts: int = 3,
        num_threads_per_worker: int | None = None,
        worker_timeout_s: float = AUTO,
        start_timeout_s: float = 1800.0,
        restart_window_s: float = 3600.0,
        placement_strategy: str | None = None,
        weight_sync: Any = None,
        timeout_factor: float = 4.0,
        timeout_floor_s: float = 120.0,
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if worker_timeout_s < 0 or start_timeout_s <= 0 or max_restarts < 0 or restart_window_s < 0:
            raise ValueError(
                "timeouts must be > 0 (worker_timeout_s >= 0), max_restarts and restart_window_s >= 0"
            )
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False)
        self.engine_name = engine_name
        self.engine_kwargs = engine_kwargs
        self.max_restarts = max_restarts
        self.worker_timeout_s = worker_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stall = StallTimeout(worker_timeout_s, start_timeout_s, timeout_factor, timeout_floor_s)
        # Weight loads do not decode: an explicit worker_timeout_s, else the start-up limit.
        self.load_timeout_s = worker_timeout_s or start_timeout_s
        self._load_key = "rollout.worker_timeout_s" if worker_timeout_s else "rollout.worker_start_timeout_s"
        self.restart_window_s = restart_window_s
        self.num_threads = num_threads_per_worker or max(1, int(num_cpus_per_worker))
        # Restarts are ours, not Ray's: a restarted actor must also get the latest weights back.
        self._actor_cls = ray.remote(RolloutWorker)
        self._actor_options = {
            "num_cpus": num_cpus_per_worker,
            "num_gpus": num_gpus_per_worker,
            "max_restarts": 0,
        }
        self._group = None
        if placement_strategy is not None:
            self._group = make_placement_group(
                "rollout",
                num_workers,
                num_cpus_per_worker,
                num_gpus_per_worker,
                placement_strategy,
                start_timeout_s,
            )
        self._sync = weight_sync if weight_sync is not None else ObjectStoreWeightSync()
        self._clock = time.monotonic  # the restart window's clock (a test may replace it)
        self._restart_times: list[deque[float]] = [deque() for _ in range(num_workers)]
        self.restarts = [0] * num_workers  # per slot, over the manager's life
        self._events = {"restarts": 0, "timeouts": 0}  # since the previous generate()
        self._totals = {"restarts_total": 0, "timeouts_total": 0}
        self.workers = [self._start_worker(slot) for slot in range(num_workers)]
        readies = dict(enumerate(w.ready.remote() for w in self.workers))
        _, failed = self._await(readies, start_timeout_s, "rollout.worker_start_timeout_s")
        if failed:
            self.shutdown()
            slot, why = next(iter(failed.items()))
            raise RuntimeError(f"rollout worker slot {slot} failed to start: {why}")
        self.version = 0
        self.last_timings: dict[str, float] = {}

    def _start_worker(self, slot: int) -> Any:
        """A worker in slot `slot`'s bundle of the placement group (a restart lands where the slot was)."""
        options = dict(self._actor_options)
        if self._group is not None:
            options["scheduling_strategy"] = in_bundle(self._group, slot)
        return self._actor_cls.options(**options).remote(
            self.engine_name, self.engine_kwargs, self.num_threads
        )

    def placement(self) -> list[dict[str, Any]]:
        """(role, slot, node) of every worker, for placement.json."""
        import ray

        nodes = ray.get([w.node.remote() for w in self.workers], timeout=self.start_timeout_s)
        return [{"role": "rollout", "slot": slot, **node} for slot, node in enumerate(nodes)]

    def _await(
        self, refs: dict[int, Any], timeout_s: float, key: str
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """Wait at most `timeout_s` for one call per slot: (results, failures as slot -> why). A worker that
        died or did not answer is a failure; an exception raised by the engine itself propagates."""
        import ray
        from ray.exceptions import RayActorError

        by_ref = {ref: slot for slot, ref in refs.items()}
        done, late = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=timeout_s)
        results: dict[int, Any] = {}
        failed = {by_ref[ref]: f"did not answer within {key}={timeout_s:g} s" for ref in late}
        self._count("timeouts", len(late))
        for ref in done:
            try:
                results[by_ref[ref]] = ray.get(ref)
            except RayActorError as err:
                failed[by_ref[ref]] = f"died: {err}"
        return results, failed

    def _count(self, event: str, n: int = 1) -> None:
        self._events[event] += n
        self._totals[f"{event}_total"] += n

    def _charge(self, slot: int, why: str) -> None:
        """Spend one restart of `slot`'s budget, or stop the run when it is spent."""
        now, times = self._clock(), self._restart_times[slot]
        while self.restart_window_s and times and times[0] <= now - self.restart_window_s:
            times.popleft()
        if len(times) >= self.max_restarts:
            window = f"the last {self.restart_window_s:g} s" if self.restart_window_s else "this run"
            raise RuntimeError(
                f"rollout worker slot {slot} {why}, and its restart budget is spent: {len(times)} restart(s) "
                f"in {window} (rollout.max_restarts={self.max_restarts} per rollout.restart_window_s="
                f"{self.restart_window_s:g}; 0: per run)"
            )
        times.append(now)
        self.restarts[slot] += 1
        self._count("restarts")

    def _restart(self, slot: int, why: str) -> None:
        """Kill slot `slot`'s worker and start a new one with the latest weights; retried until it comes
        up or the slot's restart budget is spent."""
        import ray

        while True:
            self._charge(slot, why)
            log.warning("rollout worker slot %d %s; restarting (restart %d)", slot, why, self.restarts[slot])
            ray.kill(self.workers[slot], no_restart=True)
            self.workers[slot] = worker = self._start_worker(slot)
            pending_load = self._sync.restore(worker)
            ref = pending_load if pending_load is not None else worker.ready.remote()
            _, failed = self._await({slot: ref}, self.start_timeout_s, "rollout.worker_start_timeout_s")
            if not failed:
                return
            why = f"restart failed: {failed[slot]}"

    def generate(self, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
        import ray
        from ray.exceptions import RayActorError

        start = time.perf_counter()
        shards = shard_groups(groups, len(self.workers))
        results: dict[int, list[Generation]] = {}
        worker_timings: list[dict[str, float]] = []
        pending: Pending = {}
        for i in range(len(shards)):
            self._submit_tracked(pending, i, shards[i], params)
        while pending:
            self._expire(pending, shards, params)
            if not pending:
                continue
            deadline = min(entry[1] for entry in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                shard, _, submitted, _ = pending.pop(ref)
                try:
                    generations, timings = ray.get(ref)
                except RayActorError as err:
                    self._restart(shard, f"died: {err}")
                    self._submit_tracked(pending, shard, shards[shard], params)
                    continue
                tokens = sum(len(g.response_ids) for g in generations)
                self.stall.observe(tokens, time.monotonic() - submitted)
                results[shard] = generations
                worker_timings.append(timings)
        generations = [g for i in range(len(shards)) for g in results[i]]
        samples = build_samples(groups, generations)
        self._record(start, samples, worker_timings)
        return samples

    def _expire(self, pending: Pending, shards: list[list[PromptGroup]], params: SamplingParams) -> None:
        """Restart the worker of every shard past its deadline (not done even now) and resubmit the shard."""
        import ray

        now = time.monotonic()
        expired = [ref for ref, entry in pending.items() if entry[1] <= now]
        if not expired:
            return
        _, late = ray.wait(expired, num_returns=len(expired), timeout=0)
        for ref in late:
            shard, _, _, how = pending.pop(ref)
            self._count("timeouts")
            self._restart(shard, f"did not answer a generate shard within {how}")
            self._submit_tracked(pending, shard, shards[shard], params)

    def _submit_tracked(
        self, pending: Pending, slot: int, shard: list[PromptGroup], params: SamplingParams
    ) -> None:
        seconds, how = self.stall.for_shard(sum(g.group_size for g in shard), params.max_new_tokens)
        now = time.monotonic()
        pending[self._submit(slot, shard, params)] = (slot, now + seconds, now, how)

    def _submit(self, slot: int, shard: list[PromptGroup], params: SamplingParams) -> Any:
        # Shard i always runs on worker slot i, so a failure names the slot to restart; a restarted worker
        # gets the same shard and the same seed, so it samples what the dead one would have.
        return self.workers[slot].generate.remote(expand_groups(shard), slot_params(params, slot))

    def _record(self, start: float, samples: list[Sample], worker: list[dict[str, float]]) -> None:
        self.last_timings = {
            **generation_timings(start, samples),
            "worker_generate_s_max": max((t.get("generate_s", 0.0) for t in worker), default=0.0),
            "weight_sync_s": self._sync.last_latency_s,
            **self._event_timings(),
        }
        self._events = dict.fromkeys(self._events, 0)

    def _event_timings(self) -> dict[str, float]:
        return {key: float(n) for key, n in {**self._events, **self._totals}.items()}

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Send new weights to every worker through the object store; returns the sync latency in seconds.

        A worker that dies or does not load within worker_timeout_s is restarted from the reference just
        stored, so it comes back at this version."""
        import ray

        start = time.perf_counter()
        self._sync.ref = ray.put(to_cpu_state_dict(state_dict))
        self._sync.version = version
        loads = {slot: self._sync.restore(worker) for slot, worker in enumerate(self.workers)}
        _, failed = self._await(loads, self.load_timeout_s, self._load_key)
        for slot, why in failed.items():
            self._restart(slot, why)
        latency = self._sync.last_latency_s = time.perf_counter() - start
        self.version = version
        self.last_timings.update({"weight_sync_s": latency, **self._event_timings()})
        log.debug("weight sync to version %d: %.3f s (%d workers)", version, latency, len(self.workers))
        return latency

    @property
    def broadcasts(self) -> bool:
        """Whether weights come straight from the learner (broadcast_weights) rather than as a state dict."""
        return isinstance(self._sync, BroadcastWeightSync)

    def broadcast_weights(self, version: int) -> float:
        """The learner's current weights to every worker over the weight channel, as `version`; returns
        the sync latency. The driver only waits: tensors go from learner rank 0 to the engines.

        A worker that dies or does not load within worker_timeout_s breaks the broadcast: the sender's
        side fails too (gloo sees the peer go, or times out), the group is rebuilt at the next push, and
        the worker is restarted with the learner's weights from the object store (BroadcastWeightSync)."""
        import ray

        start = time.perf_counter()
        loads, sends = self._sync.push(self.workers, version, self.load_timeout_s)
        failed = self._settle(loads, self._load_key)
        try:
            ray.get(sends, timeout=self.load_timeout_s)
        except Exception as err:  # noqa: BLE001 - a sender stuck on a dead peer; the group is rebuilt
            if not failed:
                raise RuntimeError(
                    f"weight broadcast to version {version} failed on the learner: {err}"
                ) from err
            log.warning("weight broadcast to version %d: the sender failed with a worker (%s)", version, err)
        if failed:
            self._sync.broken()
        for slot, why in failed.items():
            if why.startswith("died") or why.startswith("did not answer"):
                self._restart(slot, why)
            else:  # alive, but its weights are half-loaded: load the learner's from the object store
                self._settle({slot: self._sync.restore(self.workers[slot])}, self._load_key, True)
        latency = self._sync.last_latency_s = time.perf_counter() - start
        self.version = version
        self.last_timings.update({"weight_sync_s": latency, **self._event_timings()})
        return latency

    def _settle(self, refs: dict[int, Any], key: str, strict: bool = False) -> dict[int, str]:
        """Like _await, but an exception inside a worker is a failure of its slot too (a broken collective
        shows up as one on every receiver), unless `strict`, where it propagates."""
        import ray
        from ray.exceptions import RayActorError

        done, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.load_timeout_s)
        by_ref = {ref: slot for slot, ref in refs.items()}
        failed = {by_ref[ref]: f"did not answer within {key}={self.load_timeout_s:g} s" for ref in late}
        self._count("timeouts", len(late))
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as err:
                failed[by_ref[ref]] = f"died: {err}"
            except Exception as err:  # noqa: BLE001
                if strict:
                    raise
                failed[by_ref[ref]] = f"broadcast failed: {err}"
        return failed

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
