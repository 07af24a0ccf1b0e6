"""Rollout backends: engines in numbered slots, on Ray workers (`RolloutManager`) or in this process
(`LocalRolloutManager`). Both are `RolloutBackend`s (rollout/tasks.py): a scheduler hands a slot one
`GenTask` at a time and gets it back as soon as it is finished; `generate(groups, params)` runs one list
of groups through them (evaluation, tests, benchmarks).

Weights are versioned. Object-store weights (`publish`) are kept per version until `release`d, and a slot
loads the version its next task needs in the same call that runs the task (`RolloutWorker.run_task`), so a
task never runs on other weights and no weight load overlaps a decode. Broadcast weights (learner rank 0
-> every engine, `broadcast`) need every slot idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from cispo.core.placement import in_bundle, make_placement_group
from cispo.core.supervisor import EVENTS, RayTransport, SlotPolicy, Supervisor
from cispo.core.types import PromptGroup, Sample, SamplingParams
from rollout.engine import build_engine
from rollout.stall import AUTO, StallTimeout
from rollout.tasks import GenTask, TaskResult, run_groups
from rollout.weight_sync import BroadcastWeightSync, to_cpu_state_dict
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


class LocalRolloutManager:
    """One engine in this process, as slot 0: for unit tests, debugging and 1-CPU runs. A task runs inside
    `poll` (in whichever thread drives the backend), after loading the weights it needs."""

    num_slots = 1
    broadcasts = False

    def __init__(self, engine_name: str, engine_kwargs: dict[str, Any], **_resources: Any) -> None:
        self.engine = build_engine(engine_name, **engine_kwargs)
        self.last_timings: dict[str, float] = {}
        self.latest = 0
        self._weights: dict[int, dict[str, torch.Tensor]] = {}
        self._task: GenTask | None = None

    @property
    def version(self) -> int:
        return self.latest

    def idle_slots(self) -> list[int]:
        return [] if self._task is not None else [0]

    def can_run(self, slot: int, task: GenTask) -> bool:
        want = task.version if task.exact else self.latest
        return want == self.engine.version or want in self._weights

    def run(self, slot: int, task: GenTask) -> None:
        if slot != 0 or self._task is not None:
            raise RuntimeError(f"local rollout: slot {slot} is not idle")
        self._task = task

    def poll(self, timeout_s: float) -> list[TaskResult]:
        task, self._task = self._task, None
        if task is None:
            time.sleep(min(timeout_s, 0.01))
            return []
        want = task.version if task.exact else self.latest
        if self.engine.version != want:
            self.engine.load_weights(self._weights[want], want)
        generations = self.engine.generate(task.prompts, task.params)
        return [TaskResult(task, 0, generations, dict(self.engine.last_timings))]

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        # A copy: the learner's tensors change with its next step, and the engine may load this version later.
        self._weights[version] = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        self.latest = version

    def release(self, below: int) -> None:
        for version in [v for v in self._weights if v < below and v != self.latest]:
            del self._weights[version]

    def broadcast(self, version: int) -> float:
        raise RuntimeError("local rollout: no weight broadcast (weights come as a state dict)")

    def take_events(self) -> dict[str, float]:
        return dict.fromkeys([*EVENTS, *(f"{e}_total" for e in EVENTS)], 0.0)  # nothing remote to fail

    def placement(self) -> list[dict[str, object]]:
        return [{"role": "rollout", "in": "driver"}]

    def generate(self, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
        return run_groups(self, groups, params)

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Loads new weights at once (and publishes them); returns the seconds it took."""
        start = time.perf_counter()
        self.publish(state_dict, version)
        self.engine.load_weights(self._weights[version], version)
        self.release(version)
        latency = time.perf_counter() - start
        self.last_timings["weight_sync_s"] = latency
        return latency

    def shutdown(self) -> None:
        return None


class RolloutManager:
    """N RolloutWorker actors in numbered slots under one Supervisor (cispo/core/supervisor.py): every
    wait is bounded, a worker that dies or stalls is killed and restarted, and its task comes back lost,
    for the scheduler to run again (on any slot: a task's seed is its own, so it samples the same).

    A task's deadline is `worker_timeout_s` from its submission (0, the default: derived from its budget
    and the decode speed measured on recent tasks, see rollout.stall), a weight load `worker_timeout_s`
    (0: `start_timeout_s`), a fresh worker `start_timeout_s` to come up. A slot may restart
    `max_restarts` times within any `restart_window_s` seconds (0: within the whole run).

    `last_timings` after generate(): generate_s, new_tokens, tokens_per_s, worker_generate_s_max,
    weight_sync_s; `restarts`, `timeouts` and `deaths` since the previous generate(), and their totals.
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
        weight_sync: BroadcastWeightSync | None = None,
        timeout_factor: float = 4.0,
        timeout_floor_s: float = 120.0,
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if worker_timeout_s < 0:
            raise ValueError(f"worker_timeout_s must be >= 0 (0: auto), got {worker_timeout_s}")
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False)
        self.num_slots = num_workers
        self.stall = StallTimeout(worker_timeout_s, start_timeout_s, timeout_factor, timeout_floor_s)
        # Weight loads do not decode: an explicit worker_timeout_s, else the start-up limit.
        self.load_timeout_s = worker_timeout_s or start_timeout_s
        self._load_key = "rollout.worker_timeout_s" if worker_timeout_s else "rollout.worker_start_timeout_s"
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
        group = self._group
        transport = RayTransport(
            RolloutWorker,
            (engine_name, engine_kwargs, num_threads_per_worker or max(1, int(num_cpus_per_worker))),
            {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker},
            (lambda slot: {"scheduling_strategy": in_bundle(group, slot)}) if group is not None else None,
        )
        policy = SlotPolicy("rollout worker", start_timeout_s, max_restarts, restart_window_s, "rollout")
        self.sup: Supervisor[Any, GenTask | None] = Supervisor(transport, policy, num_workers, self._restored)
        self._sync = weight_sync
        self.latest = 0
        self._refs: dict[int, Any] = {}  # object-store weights by version
        self.slot_version = [0] * num_workers  # what each slot's engine holds (-1: unknown, reload)
        self.last_timings: dict[str, float] = {}
        self.weight_sync_s = 0.0
        self.sup.start()

    # ---------------------------------------------------------------------------------- compatibility
    @property
    def workers(self) -> list[Any]:
        return self.sup.handles

    @property
    def restarts(self) -> list[int]:
        return list(self.sup.budget.restarts)

    @property
    def version(self) -> int:
        return self.latest

    @property
    def broadcasts(self) -> bool:
        """Whether weights come straight from the learner (broadcast) rather than as a state dict."""
        return self._sync is not None

    # ---------------------------------------------------------------------------------- the backend
    def _restored(self, slot: int, worker: Any) -> Any:
        """A restarted slot: with broadcast weights it loads the learner's current ones (object store copy
        from rank 0); with object-store weights its next task loads what it needs."""
        if self._sync is not None:
            self.slot_version[slot] = self._sync.version
            return self._sync.restore(worker)
        self.slot_version[slot] = 0  # a fresh engine holds the initial policy
        return None

    def idle_slots(self) -> list[int]:
        return self.sup.idle_slots()

    def can_run(self, slot: int, task: GenTask) -> bool:
        held = self.slot_version[slot]
        if self._sync is not None:  # a slot holds what was broadcast last
            return held == task.version if task.exact else held >= task.version
        want = task.version if task.exact else self.latest
        return held == want or want in self._refs

    def run(self, slot: int, task: GenTask) -> None:
        want = task.version if task.exact else self.latest
        if self._sync is not None:
            want = self.slot_version[slot]
        if not self.can_run(slot, task):
            raise RuntimeError(
                f"rollout slot {slot} holds version {self.slot_version[slot]}, cannot load {want}"
            )
        weights = self._refs[want] if self.slot_version[slot] != want else None
        seconds, how = self.stall.for_shard(task.samples, task.params.max_new_tokens)
        self.slot_version[slot] = want

        def call(worker: Any, t: GenTask | None) -> Any:
            assert t is not None
            return worker.run_task.remote(t.prompts, t.params, weights, want)

        self.sup.submit(slot, task, call, seconds, how)

    def poll(self, timeout_s: float) -> list[TaskResult]:
        results = []
        for outcome in self.sup.wait(timeout_s):
            task = outcome.call.work
            assert task is not None
            if outcome.error is not None:
                raise outcome.error
            if not outcome.ok:  # the slot is restarting (_restored sets what its engine will hold)
                results.append(TaskResult(task, outcome.call.slot, None, failure=outcome.failure))
                continue
            generations, timings = outcome.value
            self.stall.observe(sum(len(g.response_ids) for g in generations), outcome.seconds)
            results.append(TaskResult(task, outcome.call.slot, generations, timings))
        return results

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        import ray

        if self._sync is not None:
            raise RuntimeError("rollout: this manager gets its weights by broadcast, not publish()")
        self._refs[version] = ray.put(to_cpu_state_dict(weights))
        self.latest = version

    def release(self, below: int) -> None:
        for version in [v for v in self._refs if v < below and v != self.latest]:
            del self._refs[version]

    def take_events(self) -> dict[str, float]:
        return self.sup.take_events()

    def generate(self, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
        samples = run_groups(self, groups, params)
        self.last_timings["weight_sync_s"] = self.weight_sync_s
        return samples

    def placement(self) -> list[dict[str, object]]:
        """(role, slot, node) of every worker, for placement.json."""
        import ray

        nodes = ray.get([w.node.remote() for w in self.workers], timeout=self.sup.policy.start_timeout_s)
        return [{"role": "rollout", "slot": slot, **node} for slot, node in enumerate(nodes)]

    # ---------------------------------------------------------------------------------- eager weight loads
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Publishes `version` and loads it on every (idle) worker now; a worker that dies or does not load
        within the load timeout is restarted (its next task loads the weights). Returns the seconds."""
        start = time.perf_counter()
        self.publish(state_dict, version)
        ref = self._refs[version]
        self._load_all(lambda worker, _: worker.load_weights.remote(ref, version), version)
        self.release(version)
        return self._synced(start)

    def broadcast(self, version: int) -> float:
        """The learner's current weights to every (idle) worker over the weight channel, as `version`.

        A worker that dies or does not load within the load timeout breaks the broadcast: the sender's
        side fails too (gloo sees the peer go, or times out), the group is rebuilt at the next push, and
        the worker is restarted with the learner's weights from the object store (BroadcastWeightSync)."""
        import ray

        assert self._sync is not None
        start = time.perf_counter()
        self.sup.settle(self.sup.policy.start_timeout_s)
        loads, sends = self._sync.push(self.workers, version, self.load_timeout_s)
        failed = self._load_all(lambda _w, slot: loads[slot], version, strict=False)
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
        self.sup.settle(self.sup.policy.start_timeout_s)  # restarted workers load from the object store
        self.slot_version = [version] * self.num_slots
        return self._synced(start)

    broadcast_weights = broadcast  # the name callers used before the stream

    def _load_all(self, call: Callable[[Any, int], Any], version: int, strict: bool = True) -> list[int]:
        """One load per slot, as tracked calls; failures restart their slot. Returns the failed slots."""
        self.sup.settle(self.sup.policy.start_timeout_s)
        for slot in range(self.num_slots):
            self.sup.submit(slot, None, lambda w, _t, s=slot: call(w, s), self.load_timeout_s, self._load_key)
        failed: list[int] = []
        while self.sup.calls:
            for outcome in self.sup.wait(self.load_timeout_s):
                slot = outcome.call.slot
                if outcome.error is not None and strict:
                    raise outcome.error
                if outcome.error is not None:  # alive, weights half-loaded: the learner's from the store
                    failed.append(slot)
                    self.sup.restart(slot, f"broadcast failed: {outcome.error}", charge=False)
                elif not outcome.ok:
                    failed.append(slot)
                else:
                    self.slot_version[slot] = version
        self.latest = version
        return failed

    def _synced(self, start: float) -> float:
        self.weight_sync_s = latency = time.perf_counter() - start
        self.last_timings.update({"weight_sync_s": latency, **self.sup.take_events()})
        return latency

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self.sup.shutdown()
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
