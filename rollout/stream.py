"""Generation as a stream: prompt groups go out from a queue to whichever engine slot is free, and each
comes back, as soon as it is finished, to a callback (the driver scores it there).

One pump thread drives the backend (rollout/tasks.py:RolloutBackend); nothing else touches it, so weight
loads happen between tasks, never during a decode of the same engine. The caller adds jobs, publishes or
broadcasts weights and reads counters, from any thread.

Versions. A job names the policy version it needs. Without partial rollouts it runs whole at exactly that
version (the schedule decides it, so the samples do not depend on timing). With `partial=True` a job runs
in chunks of at most `chunk_tokens` new tokens, each on the newest weights there are: a sequence in flight
continues under new weights after a sync, and every token keeps the version and the behaviour log-prob it
was sampled with (Sample.token_versions), so the CISPO weight of each token is exact.

A broadcast (learner rank 0 -> every engine) needs every slot idle: it waits until the jobs that need an
older version have run, holding back the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from cispo.core.types import Generation, PromptGroup, Sample, SamplingParams
from rollout.tasks import GenTask, RolloutBackend, TaskResult, group_seed, sample_of


@dataclass(eq=False)
class GroupJob:
    """Prompt groups to generate together (one engine call: a batch), at `version` (exactly, or at least
    with partial rollouts). Which groups go together is the scheduler's choice, fixed before they run, so
    with the job's own seed the samples depend neither on the slot nor on timing. Jobs run in
    order of `priority` (lower first: evaluation before training, older steps first), then of arrival."""

    key: Hashable
    groups: list[PromptGroup]
    params: SamplingParams  # its own seed: what it samples depends on neither the slot nor the timing
    version: int
    priority: float = 0.0
    exact: bool = True  # False: at least `version`, on the newest weights a slot can have
    # progress of a partial job: per sample, the tokens, log-probs, versions and finish reason so far
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    versions: list[list[int]] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    routing: list[Any] = field(default_factory=list)
    chunks: int = 0
    seq: int = 0


@dataclass
class FinishedGroup:
    """A job's samples (one per group member, groups in order)."""

    key: Hashable
    groups: list[PromptGroup]
    samples: list[Sample]
    chunks: int


class StreamStats:
    """Counters over an interval (`take()` resets): slot idle seconds, tasks run, tasks lost."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.reset()

    def reset(self) -> None:
        self.since = time.perf_counter()
        self.idle_s = 0.0
        self.tasks = 0
        self.lost = 0

    def take(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        out = {
            "throughput/worker_idle_frac": min(1.0, self.idle_s / (elapsed * self.num_slots)),
            "throughput/tasks": float(self.tasks),
            "rollout/tasks_lost": float(self.lost),
        }
        self.reset()
        return out


class GenerationStream:
    def __init__(
        self,
        backend: RolloutBackend,
        on_finished: Callable[[FinishedGroup], None],
        partial: bool = False,
        chunk_tokens: int = 0,
    ) -> None:
        if partial and chunk_tokens < 1:
            raise ValueError(f"partial rollouts need chunk_tokens >= 1, got {chunk_tokens}")
        self.backend, self.on_finished = backend, on_finished
        self.partial, self.chunk_tokens = partial, chunk_tokens
        self.stats = StreamStats(backend.num_slots)
        self._cond = threading.Condition()
        self._queue: list[GroupJob] = []
        self._running: dict[int, GroupJob] = {}  # slot -> the job it runs
        self._ops: list[tuple[Callable[[], Any], Future]] = []
        self._broadcast: tuple[int, Future] | None = None
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="rollout-stream", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------- the caller's side
    def add(self, jobs: list[GroupJob]) -> None:
        with self._cond:
            self._raise_if_failed()
            for job in jobs:
                job.seq = next(self._seq)
                self._queue.append(job)
            self._cond.notify_all()

    def depth(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._queue) + len(self._running)

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Makes `version` available to the slots (object store); returns once the copy is taken."""
        self._in_pump(lambda: self.backend.publish(weights, version))

    def release(self, below: int) -> None:
        self._in_pump(lambda: self.backend.release(below))

    def broadcast(self, version: int) -> float:
        """Broadcasts the learner's weights as `version` once every slot is idle (jobs that need an older
        version run first); returns the seconds the broadcast itself took."""
        future: Future = Future()
        with self._cond:
            self._raise_if_failed()
            self._broadcast = (version, future)
            self._cond.notify_all()
        return float(self._wait(future))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` in the pump thread, between tasks (e.g. reading the backend's counters)."""
        return self._in_pump(fn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    def _in_pump(self, fn: Callable[[], Any]) -> Any:
        future: Future = Future()
        with self._cond:
            self._raise_if_failed()
            self._ops.append((fn, future))
            self._cond.notify_all()
        return self._wait(future)

    def _wait(self, future: Future) -> Any:
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                with self._cond:
                    self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the rollout stream stopped: {self._error}") from self._error
        if self._closed:
            raise RuntimeError("the rollout stream is closed")

    # ---------------------------------------------------------------------------------- the pump thread
    def _pump(self) -> None:
        ops: list[tuple[Callable[[], Any], Future]] = []
        last, idle = time.perf_counter(), self.stats.num_slots
        try:
            while True:
                now = time.perf_counter()
                self.stats.idle_s += (now - last) * idle  # slots with nothing to run since the last look
                last = now
                with self._cond:
                    if self._closed:
                        return
                    ops, self._ops = self._ops, []
                    if not ops and not self._queue and not self._running and self._broadcast is None:
                        idle = self.stats.num_slots
                        self._cond.wait(timeout=0.2)
                        continue
                for fn, future in ops:
                    future.set_result(fn())
                ops = []
                self._maybe_broadcast()
                self._dispatch()
                idle = self.stats.num_slots - len(self._running)
                if not self._running:  # queued jobs wait for a version or a broadcast: no busy loop
                    with self._cond:
                        self._cond.wait(timeout=0.05)
                    continue
                for result in self.backend.poll(0.05):
                    self._settle(result)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, who stops the run with it
            with self._cond:
                self._error = err
                self._cond.notify_all()
            for _, future in ops + self._ops:
                if not future.done():
                    future.set_exception(err)
            if self._broadcast is not None:
                self._broadcast[1].set_exception(err)

    def _maybe_broadcast(self) -> None:
        if self._broadcast is None or self._running:
            return
        version, future = self._broadcast
        if any(self._blocks_broadcast(job, version) for job in self._queue):
            return
        self._broadcast = None
        future.set_result(self.backend.broadcast(version))

    @staticmethod
    def _blocks_broadcast(job: GroupJob, version: int) -> bool:
        """A job that needs exactly a version older than the one about to be broadcast runs first."""
        return job.exact and not job.chunks and job.version < version

    def _dispatch(self) -> None:
        idle = self.backend.idle_slots()
        with self._cond:
            order = sorted(self._queue, key=lambda j: (j.priority, j.seq))
        if not order:
            return
        pending = self._broadcast[0] if self._broadcast is not None else None
        for slot in idle:
            for job in order:
                if pending is not None and not self._blocks_broadcast(job, pending):
                    continue  # held back until the broadcast
                task = self._task(job)
                if self.backend.can_run(slot, task):
                    self.backend.run(slot, task)
                    self._running[slot] = job
                    order.remove(job)
                    with self._cond:
                        self._queue.remove(job)
                    self.stats.tasks += 1
                    break

    def _task(self, job: GroupJob) -> GenTask:
        params, rows = job.params, self._rows(job)
        if not self.partial:
            return GenTask(job.key, [list(g.prompt_ids) for g in rows], params, job.version, job.exact)
        if not job.tokens:
            n = len(rows)
            job.tokens, job.logprobs, job.versions = (
                [[] for _ in range(n)],
                [[] for _ in range(n)],
                [[] for _ in range(n)],
            )
            job.finish, job.routing = [""] * n, [None] * n
        open_rows = [i for i, reason in enumerate(job.finish) if not reason]
        done = len(job.tokens[open_rows[0]])  # every open row has generated as many tokens as the others
        chunk = dataclasses.replace(
            params,
            max_new_tokens=min(self.chunk_tokens, params.max_new_tokens - done),
            seed=group_seed(params.seed, 0, job.chunks),
        )
        prompts = [list(rows[i].prompt_ids) + job.tokens[i] for i in open_rows]
        return GenTask(job.key, prompts, chunk, job.version, exact=False)

    def _settle(self, result: TaskResult) -> None:
        job = self._running.pop(result.slot)
        if result.generations is None:  # lost with its slot: again, from where it was
            self.stats.lost += 1
            with self._cond:
                self._queue.append(job)
            return
        if not self.partial:
            samples = [sample_of(g, gen) for g, gen in zip(self._rows(job), result.generations, strict=True)]
            self.on_finished(FinishedGroup(job.key, job.groups, samples, 1))
            return
        self._merge(job, result.generations)
        job.chunks += 1
        if all(job.finish):
            self.on_finished(FinishedGroup(job.key, job.groups, self._samples(job), job.chunks))
        else:
            with self._cond:
                self._queue.append(job)

    def _merge(self, job: GroupJob, generations: list[Generation]) -> None:
        budget = job.params.max_new_tokens
        for i, gen in zip([i for i, r in enumerate(job.finish) if not r], generations, strict=True):
            job.tokens[i] += gen.response_ids
            job.logprobs[i] += gen.logprobs
            job.versions[i] += [gen.policy_version] * len(gen.response_ids)
            job.routing[i] = gen.routed_experts  # the last chunk's prefill covers every earlier position
            if gen.finish_reason != "length" or len(job.tokens[i]) >= budget:
                job.finish[i] = gen.finish_reason

    @staticmethod
    def _rows(job: GroupJob) -> list[PromptGroup]:
        """The group of each row of the job's engine call: group g's prompt g.group_size times."""
        return [g for g in job.groups for _ in range(g.group_size)]

    @staticmethod
    def _samples(job: GroupJob) -> list[Sample]:
        samples = []
        for i, group in enumerate(GenerationStream._rows(job)):
            versions = job.versions[i]
            gen = Generation(
                job.tokens[i], job.logprobs[i], job.finish[i], min(versions, default=0), job.routing[i]
            )
            mixed = len(set(versions)) > 1
            samples.append(sample_of(group, gen, versions if mixed else None))
        return samples
