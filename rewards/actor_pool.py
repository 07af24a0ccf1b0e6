"""Reward scoring on a pool of Ray actors: N actors, each with its own RewardScorer (its own reward worker
processes, and so, for code rewards, its own sandboxes), scoring chunks of a batch concurrently.

``RewardActorPool`` has the RewardScorer interface the rollout stage uses (``score``, ``metrics``,
``close``) and reports the same metric keys with the same values: each actor returns its chunk's raw
counters and the driver adds them up, so the per-reward means are over the whole call, and
``reward.stop_error_fraction`` is applied to the whole call, not per chunk. ``submit(inputs)`` /
``result(handle)`` split ``score`` in two, so scoring can run while the caller does something else.

A chunk is on at most one actor at a time, and its result is taken exactly once. Every wait is bounded: a
chunk gets ``grace_s + timeout_s * ceil(tasks / max_workers)`` (the scorer's own per-sample timeout bounds
each task; ``grace_s`` covers replacing reward workers and the Ray round trip), a fresh actor
``start_timeout_s``. An actor that dies (ray.kill, a segfault, ``os._exit`` in a thread-isolated reward) or
misses its deadline (frozen) is killed, replaced, and its chunk scored again from the start. The restart
budget is per slot and per sliding window, as for rollout workers (rollout/manager.py): a slot may restart
``max_restarts`` times within ``restart_window_s`` seconds (0: within the pool's life); one more stops the
run with a RuntimeError naming the actor.

Pools built with ``RewardActorPool.shared`` and the same settings share one set of actors (the driver's
training and evaluation scorers), each with its own counters; the actors go with the last one closed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from cispo.core.registry import callable_from
from rewards.base import RewardError, RewardInput, RewardResult
from rewards.registry import REWARDS, load_reward, register_reward
from rewards.scorer import RewardScorer, RewardSpec, failure
from rewards.workers import WorkerSpec, worker_spec

log = logging.getLogger(__name__)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------------------------- the actor


class _ChunkScorer(RewardScorer):
    """Scores one chunk and never stops the run itself: it reports the samples whose reward raised or
    timed out, and the pool applies stop_error_fraction over the whole call."""

    failed: list[int]
    first_failure: tuple[str, int, str, str, str] | None = None

    def _stop_if_broken(self, tasks: list[Any], inputs: list[RewardInput]) -> None:
        self.failed = sorted({t.index for t in tasks if t.error is not None or t.timed_out})
        first = next((t for t in tasks if t.error is not None or t.timed_out), None)
        self.first_failure = None
        if first is not None:
            name, inp, trace = self.specs[first.spec].name, first.inp, failure(first, self.timeout_s)
            self.first_failure = (name, first.index, inp.prompt[:200], inp.completion[:200], trace)

    def take_counters(self) -> tuple[dict[str, int], dict[str, float]]:
        counts, sums = dict(self._counts), dict(self._sums)
        self._counts.clear()
        self._sums.clear()
        return counts, sums


@dataclass
class ChunkOutcome:
    """An actor's answer for one chunk: results in order, raw counters, the samples that failed."""

    results: list[RewardResult]
    counts: dict[str, int]
    sums: dict[str, float]
    failed: list[int]
    first_failure: tuple[str, int, str, str, str] | None  # reward, chunk index, prompt, completion, trace
    pid: int


class RewardActor:
    """One Ray actor: a RewardScorer of its own. Plain Python, wrapped with ray.remote by the pool."""

    def __init__(self, specs: list[WorkerSpec], weights: list[float], options: dict[str, Any]) -> None:
        for s in specs:  # a name the driver registered from a module: the same function, found by its path
            if s.path != s.name and s.name not in REWARDS:
                register_reward(s.name, low=s.low, high=s.high)(callable_from(REWARDS, s.path))
        specs_here = [RewardSpec(s.name, w, dict(s.kwargs), s.low, s.high) for s, w in zip(specs, weights)]
        self.scorer = _ChunkScorer(specs_here, **options, stop_error_fraction=math.inf)

    def ready(self) -> int:
        return os.getpid()

    def score(self, inputs: list[RewardInput]) -> ChunkOutcome:
        results = self.scorer.score(inputs)
        counts, sums = self.scorer.take_counters()
        return ChunkOutcome(results, counts, sums, self.scorer.failed, self.scorer.first_failure, os.getpid())

    def close(self) -> None:
        self.scorer.close()


# ---------------------------------------------------------------------------------------------- the driver


@dataclass(eq=False)
class _Chunk:
    handle: ScoreHandle
    start: int  # the call's index of the chunk's first sample
    inputs: list[RewardInput]
    outcome: ChunkOutcome | None = None


@dataclass(eq=False)
class ScoreHandle:
    """What ``submit`` returns: ``result(handle)`` gives the scores, once."""

    owner: RewardActorPool
    size: int
    chunks: list[_Chunk] = field(default_factory=list)
    error: BaseException | None = None
    taken: bool = False

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.outcome is not None for c in self.chunks)


@dataclass(eq=False)
class _Running:
    ref: Any
    chunk: _Chunk
    deadline: float
    allowance: float


@dataclass
class ActorSettings:
    """Everything that makes a set of actors; its repr is the key under which pools share one."""

    specs: list[WorkerSpec]
    weights: list[float]
    scorer: dict[str, Any]  # RewardScorer keyword arguments: timeout_s, strict, max_workers, isolation
    num_actors: int
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 1
    max_restarts: int = 3
    restart_window_s: float = 3600.0
    grace_s: float = 60.0
    start_timeout_s: float = 300.0


class _Actors:
    """The actors, the queue of chunks waiting for one, and the chunk each one is scoring."""

    def __init__(self, settings: ActorSettings) -> None:
        import ray

        self.s = settings
        self.options = settings.scorer
        self._cls = ray.remote(RewardActor)
        env = dict.fromkeys(THREAD_VARS, str(settings.threads_per_actor))
        self._actor_options = {
            "num_cpus": settings.cpus_per_actor,
            "max_restarts": 0,  # restarts are ours: the chunk must be resubmitted
            "runtime_env": {"env_vars": env},
        }
        self.lock = threading.RLock()
        self.users = 0
        self.queue: deque[_Chunk] = deque()
        self.busy: dict[int, _Running] = {}  # slot -> the chunk it is scoring
        self.dirty: set[int] = set()  # slots left busy by an aborted wait: replaced before their next chunk
        self._restart_times: list[deque[float]] = [deque() for _ in range(settings.num_actors)]
        self.actors = [self._start() for _ in range(settings.num_actors)]
        self.pids: list[int] = [0] * settings.num_actors
        for slot in range(settings.num_actors):
            why = self._await_ready(slot)
            if why:
                self.shutdown()
                raise RuntimeError(f"reward actor {slot} failed to start: {why}")

    def _start(self) -> Any:
        return self._cls.options(**self._actor_options).remote(self.s.specs, self.s.weights, self.options)

    def _await_ready(self, slot: int) -> str:
        """'' once slot's actor answers, else why not (it died, or did not answer within start_timeout_s)."""
        import ray
        from ray.exceptions import RayActorError

        ref = self.actors[slot].ready.remote()
        ready, _ = ray.wait([ref], timeout=self.s.start_timeout_s)
        if not ready:
            return f"did not start within start_timeout_s={self.s.start_timeout_s:g} s"
        try:
            self.pids[slot] = ray.get(ref)
        except RayActorError as err:
            return f"died while starting: {err}"  # whole: it holds the error that stopped it loading
        return ""

    def _charge(self, slot: int, why: str) -> None:
        """Spend one restart of `slot`'s budget, or stop the run when it is spent."""
        now, times = time.monotonic(), self._restart_times[slot]
        while self.s.restart_window_s and times and times[0] <= now - self.s.restart_window_s:
            times.popleft()
        if len(times) >= self.s.max_restarts:
            window = f"the last {self.s.restart_window_s:g} s" if self.s.restart_window_s else "this run"
            raise RuntimeError(
                f"reward actor {slot} (pid {self.pids[slot]}) {why}, and its restart budget is spent: "
                f"{len(times)} restart(s) in {window} (max_restarts={self.s.max_restarts} per "
                f"restart_window_s={self.s.restart_window_s:g}; 0: per run)"
            )
        times.append(now)

    def restart(self, slot: int, why: str, charge: bool = True) -> None:
        """Kill slot's actor and start another, until one comes up or the slot's budget is spent."""
        import ray

        while True:
            if charge:
                self._charge(slot, why)
            log.warning("reward actor %d (pid %d) %s; restarting", slot, self.pids[slot], why)
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._start()
            failed = self._await_ready(slot)
            if not failed:
                return
            why, charge = f"restart failed: {failed}", True

    def allowance(self, chunk: _Chunk) -> float:
        """Seconds a chunk may take: every task its timeout, max_workers at a time, plus grace_s."""
        waves = math.ceil(len(chunk.inputs) * len(self.s.specs) / self.options["max_workers"])
        return self.s.grace_s + self.options["timeout_s"] * waves

    def dispatch(self) -> None:
        """Every idle actor takes the next waiting chunk."""
        for slot in range(len(self.actors)):
            if not self.queue:
                return
            if slot in self.busy:
                continue
            if slot in self.dirty:
                self.dirty.discard(slot)
                self.restart(slot, "was left scoring an abandoned chunk", charge=False)
            chunk = self.queue.popleft()
            allowance = self.allowance(chunk)
            ref = self.actors[slot].score.remote(chunk.inputs)
            self.busy[slot] = _Running(ref, chunk, time.monotonic() + allowance, allowance)

    def wait_for(self, handle: ScoreHandle) -> None:
        """Run the pool until `handle` is done (other handles' chunks progress too)."""
        import ray

        while not handle.done:
            self.dispatch()
            if not self.busy:
                raise RuntimeError("reward actor pool: chunks pending but none running")  # cannot happen
            now = time.monotonic()
            nearest = min(r.deadline for r in self.busy.values())
            refs = {r.ref: slot for slot, r in self.busy.items()}
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, min(nearest - now, 5.0)))
            for ref in ready:
                self._finish(refs[ref])
            self._expire()

    def _finish(self, slot: int) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        chunk = (running := self.busy.pop(slot)).chunk
        try:
            outcome = ray.get(running.ref)
        except RayTaskError as err:  # the scorer itself raised (reward.strict): the run stops with it
            cause = err.cause if isinstance(err.cause, BaseException) else err
            error = RewardError(f"reward actor {slot}, on the chunk from sample {chunk.start}: {cause}")
            error.__cause__, chunk.handle.error = cause, error
            return
        except RayError as err:  # the actor died (killed, crashed, out of memory)
            self._count(chunk, "actor_restarts")
            self.queue.appendleft(chunk)  # before restart(): a spent budget leaves it queued, not lost
            self.restart(slot, f"died ({_short(err)})")
            return
        chunk.outcome = outcome
        self.pids[slot] = outcome.pid

    def _expire(self) -> None:
        """Kill and replace every actor past its chunk's deadline; the chunk goes back to the queue."""
        import ray

        now = time.monotonic()
        for slot in [slot for slot, r in self.busy.items() if r.deadline <= now]:
            running = self.busy[slot]
            if ray.wait([running.ref], timeout=0)[0]:
                self._finish(slot)  # it answered after all
                continue
            del self.busy[slot]
            self._count(running.chunk, "actor_timeouts")
            self._count(running.chunk, "actor_restarts")
            self.queue.appendleft(running.chunk)
            n = len(running.chunk.inputs)
            self.restart(slot, f"did not score its chunk of {n} samples within {running.allowance:g} s")

    @staticmethod
    def _count(chunk: _Chunk, key: str) -> None:
        chunk.handle.owner._events[key] += 1

    def abandon(self, handle: ScoreHandle) -> None:
        """After an aborted wait: `handle`'s queued chunks are dropped, and actors scoring them are replaced
        before their next chunk (so that one is not timed while queued behind stale work)."""
        self.queue = deque(c for c in self.queue if c.handle is not handle)
        for slot, running in list(self.busy.items()):
            if running.chunk.handle is handle:
                del self.busy[slot]
                self.dirty.add(slot)

    def shutdown(self) -> None:
        import ray

        closing = [a.close.remote() for a in self.actors]
        ray.wait(closing, num_returns=len(closing), timeout=2.0)  # idle actors stop their workers cleanly
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _short(err: BaseException) -> str:
    """Ray's death errors run to many lines; their type and first line say what happened."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


_SHARED: dict[str, _Actors] = {}
_SHARED_LOCK = threading.Lock()


class RewardActorPool:
    """``score(inputs)`` like RewardScorer.score, on ``num_actors`` Ray actors; ``metrics()`` and ``close()``
    like RewardScorer's. The caller owns ray.init (the driver's start_ray).

    ``chunk_size``: samples per chunk (None: the batch split evenly over the actors, one chunk each).
    ``threads_per_actor``: OMP/MKL/OpenBLAS threads of each actor and its workers (None: its CPUs, >= 1).
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        *,
        num_actors: int,
        cpus_per_actor: float = 1.0,
        threads_per_actor: int | None = None,
        timeout_s: float = 10.0,
        strict: bool = False,
        max_workers: int = 2,
        stop_error_fraction: float = 1.0,
        isolation: str = "process",
        chunk_size: int | None = None,
        max_restarts: int = 3,
        restart_window_s: float = 3600.0,
        grace_s: float = 60.0,
        start_timeout_s: float = 300.0,
        share: bool = False,
    ) -> None:
        counts = {"num_actors": num_actors, "max_workers": max_workers, "chunk_size": chunk_size or 1}
        positive = {"cpus_per_actor": cpus_per_actor, "timeout_s": timeout_s, "grace_s": grace_s}
        bad = [k for k, v in counts.items() if v < 1] + [k for k, v in positive.items() if v <= 0]
        bad += ["start_timeout_s"] * (start_timeout_s <= 0) + ["max_restarts"] * (max_restarts < 0)
        bad += ["restart_window_s"] * (restart_window_s < 0) + ["specs (none given)"] * (not specs)
        if bad:
            raise ValueError(f"RewardActorPool: out of range: {bad}")
        self.specs = list(specs)
        # Loaded here, so an unknown name or a bad signature fails in the driver with its own error; each
        # actor is sent the path that finds the same function in a fresh process.
        loaded = [load_reward(s.name, s.kwargs, low=s.low, high=s.high) for s in self.specs]
        self._settings = ActorSettings(
            [worker_spec(s.name, s.kwargs, r) for s, r in zip(self.specs, loaded)],
            [s.weight for s in self.specs],
            {"timeout_s": timeout_s, "strict": strict, "max_workers": max_workers, "isolation": isolation},
            num_actors,
            cpus_per_actor,
            threads_per_actor or max(1, int(cpus_per_actor)),
            max_restarts,
            restart_window_s,
            grace_s,
            start_timeout_s,
        )
        self.stop_error_fraction, self.chunk_size = stop_error_fraction, chunk_size
        self._actors = _join(self._settings, share)
        self._closed = False
        self._counts: Counter[str] = Counter()
        self._sums: Counter[str] = Counter()
        self._events: Counter[str] = Counter()

    @classmethod
    def shared(cls, specs: list[RewardSpec], **kwargs: Any) -> RewardActorPool:
        """A pool on the actors of a live pool built with the same settings (started if there is none),
        with counters of its own."""
        return cls(specs, share=True, **kwargs)

    def actors(self) -> list[tuple[Any, int]]:
        """(Ray actor handle, process id as of its last answer) of each actor, by slot."""
        return list(zip(self._actors.actors, self._actors.pids))

    def submit(self, inputs: list[RewardInput]) -> ScoreHandle:
        """Starts scoring `inputs` on the actors and returns at once; ``result(handle)`` waits."""
        if self._closed:
            raise RuntimeError("RewardActorPool: submit() after close()")
        handle = ScoreHandle(self, len(inputs))
        size = self.chunk_size or max(1, math.ceil(len(inputs) / self._settings.num_actors))
        handle.chunks = [_Chunk(handle, i, list(inputs[i : i + size])) for i in range(0, len(inputs), size)]
        with self._actors.lock:
            self._actors.queue.extend(handle.chunks)
            self._actors.dispatch()
        return handle

    def result(self, handle: ScoreHandle) -> list[RewardResult]:
        """The combined results of a submit(), in input order; taken once."""
        if handle.owner is not self or handle.taken:
            raise ValueError("RewardActorPool.result: a handle of another pool, or one already taken")
        handle.taken = True
        with self._actors.lock:
            try:
                self._actors.wait_for(handle)
            except BaseException:
                self._actors.abandon(handle)
                raise
        if handle.error is not None:
            self._actors.abandon(handle)
            raise handle.error
        outcomes = [c.outcome for c in handle.chunks]
        self._stop_if_broken(handle, outcomes)
        for outcome in outcomes:
            self._counts.update(outcome.counts)
            self._sums.update(outcome.sums)
        self._counts["reward/samples"] += 0  # present even for an empty call, as in RewardScorer
        return [r for outcome in outcomes for r in outcome.results]

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]:
        """Combined results in input order; one failing sample, reward or actor never loses the others."""
        return self.result(self.submit(inputs))

    def _stop_if_broken(self, handle: ScoreHandle, outcomes: list[Any]) -> None:
        """RewardScorer's rule over the whole call: this fraction of its samples failed or timed out."""
        failed = sum(len(o.failed) for o in outcomes)
        if not handle.size or failed < self.stop_error_fraction * handle.size:
            return
        chunk, outcome = next((c, o) for c, o in zip(handle.chunks, outcomes) if o.first_failure)
        name, index, prompt, completion, trace = outcome.first_failure
        raise RewardError(
            f"reward {name!r} failed on {failed} of {handle.size} samples "
            f"(reward.stop_error_fraction={self.stop_error_fraction}); "
            f"first failure, on sample {chunk.start + index} "
            f"(prompt {prompt!r}, completion {completion!r}):\n{trace}"
        )

    def metrics(self) -> dict[str, float]:
        """RewardScorer's keys and values since the previous call, plus reward/actor_restarts and
        reward/actor_timeouts (actors replaced, and those for missing a deadline)."""
        n = self._counts.get("reward/samples", 0)
        out: dict[str, float] = {k: float(v) for k, v in self._counts.items()}
        out.update({k: v / n for k, v in self._sums.items()} if n else {})
        out.setdefault("reward/errors", 0.0)
        out.setdefault("reward/timeouts", 0.0)
        out["reward/actor_restarts"] = float(self._events["actor_restarts"])
        out["reward/actor_timeouts"] = float(self._events["actor_timeouts"])
        self._counts.clear()
        self._sums.clear()
        self._events.clear()
        return out

    def close(self) -> None:
        """Stops the actors (the last pool sharing them does); score() afterwards raises. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _SHARED_LOCK:
            self._actors.users -= 1
            if self._actors.users > 0:
                return
            if _SHARED.get(repr(self._settings)) is self._actors:
                del _SHARED[repr(self._settings)]
        with self._actors.lock:
            self._actors.shutdown()

    def __enter__(self) -> RewardActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(settings: ActorSettings, share: bool) -> _Actors:
    """New actors, or (`share`) those of a live pool with the same settings; counts the user."""
    with _SHARED_LOCK:
        actors = _SHARED.get(repr(settings)) if share else None
        if actors is None:
            actors = _Actors(settings)
            if share:
                _SHARED[repr(settings)] = actors
        actors.users += 1
        return actors
