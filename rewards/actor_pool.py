"""Reward scoring on a pool of Ray actors: N actors, each with its own RewardScorer (its own reward worker
processes, and so, for code rewards, its own sandboxes), scoring chunks of a batch concurrently.

One ``RewardActorPool`` owns the actors; its *views* (``pool.view("train")``, ``pool.view("eval")``) share
them and keep their own counters, and each is a :class:`~rewards.scorer.Scorer` (``submit``, ``result``,
``score``, ``metrics``, ``close``), reporting the in-driver scorer's metric keys with the same values: each
actor returns its chunk's raw counters and the view adds them up when the result is taken, so the per-reward
means are over the whole call, and ``reward.stop_error_fraction`` is applied to the whole call, not per
chunk. The pool itself scores as its ``train`` view. Closing the pool, or every view it handed out, stops the
actors.

The actors are the slots of a :class:`~cispo.core.supervisor.Supervisor` (``RayTransport``): a chunk is on at
most one actor at a time, and its result is taken exactly once. A chunk must be scored within ``grace_s +
timeout_s * ceil(tasks / max_workers)`` (the scorer's own per-sample timeout bounds each task; ``grace_s``
covers replacing reward workers and the Ray round trip), a fresh actor must answer within
``start_timeout_s``. An actor that dies (ray.kill, a segfault, ``os._exit`` in a thread-isolated reward) or
misses its deadline (frozen) is killed and replaced, and its chunk scored again from the start. The restart
budget is the supervisor's: ``max_restarts`` per slot within ``restart_window_s`` seconds (0: within the
pool's life); one more stops the run with a RuntimeError naming the actor's slot.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from cispo.core.registry import callable_from
from cispo.core.supervisor import Outcome, RayTransport, SlotPolicy, Supervisor
from rewards.base import RewardError, RewardInput, RewardResult
from rewards.registry import REWARDS, load_reward, register_reward
from rewards.scorer import RewardScorer, RewardSpec, ScoreHandle, counter_metrics, failure
from rewards.workers import WorkerSpec, worker_spec

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------------------------- the actor


class _ChunkScorer(RewardScorer):
    """Scores one chunk and never stops the run itself: it reports the samples whose reward raised or
    timed out, and the view applies stop_error_fraction over the whole call."""

    failed: list[int]
    first_failure: tuple[str, int, str, str, str] | None = None

    def _stop_if_broken(self, tasks: list[Any], inputs: list[RewardInput]) -> None:
        self.failed = sorted({t.index for t in tasks if t.error is not None or t.timed_out})
        first = next((t for t in tasks if t.error is not None or t.timed_out), None)
        self.first_failure = None
        if first is not None:
            name, inp, trace = self.specs[first.spec].name, first.inp, failure(first, self.timeout_s)
            self.first_failure = (name, first.index, inp.prompt[:200], inp.completion[:200], trace)


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
    """One Ray actor: a RewardScorer of its own. Plain Python, wrapped with ray.remote by the transport."""

    def __init__(self, specs: list[WorkerSpec], weights: list[float], options: dict[str, Any]) -> None:
        for s in specs:  # a name the driver registered from a module: the same function, found by its path
            if s.path != s.name and s.name not in REWARDS:
                register_reward(s.name, low=s.low, high=s.high)(callable_from(REWARDS, s.path))
        specs_here = [RewardSpec(s.name, w, dict(s.kwargs), s.low, s.high) for s, w in zip(specs, weights)]
        self.scorer = _ChunkScorer(specs_here, **options, stop_error_fraction=math.inf)

    def ready(self) -> int:
        return os.getpid()

    def score(self, inputs: list[RewardInput]) -> ChunkOutcome:
        scored = self.scorer.score_batch(inputs)
        s = self.scorer
        return ChunkOutcome(
            scored.results, dict(scored.counts), dict(scored.sums), s.failed, s.first_failure, os.getpid()
        )

    def close(self) -> None:
        self.scorer.close()


# ---------------------------------------------------------------------------------------------- the driver


@dataclass(eq=False)
class _Chunk:
    handle: PoolHandle
    start: int  # the call's index of the chunk's first sample
    inputs: list[RewardInput]
    outcome: ChunkOutcome | None = None


@dataclass(eq=False)
class PoolHandle(ScoreHandle):
    """What a view's ``submit`` returns: ``result(handle)`` gives the scores, once."""

    view: PoolView
    size: int
    chunks: list[_Chunk] = field(default_factory=list)
    error: BaseException | None = None
    events: Counter[str] = field(default_factory=Counter)  # actor restarts and timeouts on its chunks

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.outcome is not None for c in self.chunks)


def _ready_remote(actor: Any) -> Any:
    return actor.ready.remote()


def _score_remote(actor: Any, chunk: _Chunk) -> Any:
    return actor.score.remote(chunk.inputs)


class PoolView:
    """One user's scorer on the pool's actors (training, evaluation): a Scorer with counters of its own."""

    def __init__(self, pool: RewardActorPool, name: str) -> None:
        self.pool, self.name = pool, name
        self.closed = False
        self._counts: Counter[str] = Counter()
        self._sums: Counter[str] = Counter()
        self._events: Counter[str] = Counter()

    def submit(self, inputs: list[RewardInput]) -> ScoreHandle:
        """Starts scoring `inputs` on the actors and returns at once; ``result(handle)`` waits."""
        return self.pool._submit(self, inputs)

    def result(self, handle: ScoreHandle) -> list[RewardResult]:
        """The combined results of a submit(), in input order; taken once. Its counters are added now, so
        ``metrics()`` right after reflects it (rewards.scorer's docstring)."""
        if not isinstance(handle, PoolHandle) or handle.view is not self or handle.taken:
            raise ValueError(f"reward pool view {self.name!r}: a handle of another view, or already taken")
        handle.taken = True
        return self.pool._result(handle)

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]:
        """Combined results in input order; one failing sample, reward or actor never loses the others."""
        return self.result(self.submit(inputs))

    def metrics(self) -> dict[str, float]:
        """RewardScorer's keys and values over the results taken since the previous call, plus
        reward/actor_restarts and reward/actor_timeouts (actors replaced while scoring those calls' chunks,
        and those for missing a deadline)."""
        with self.pool._lock:
            out = counter_metrics(self._counts, self._sums)
            out["reward/actor_restarts"] = float(self._events["actor_restarts"])
            out["reward/actor_timeouts"] = float(self._events["actor_timeouts"])
            self._counts.clear()
            self._sums.clear()
            self._events.clear()
        return out

    def actors(self) -> list[tuple[Any, int]]:
        return self.pool.actors()

    def close(self) -> None:
        """Closes this view; the pool stops its actors once every view it handed out is closed."""
        self.closed = True
        self.pool._view_closed()

    def __enter__(self) -> PoolView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RewardActorPool:
    """``num_actors`` Ray actors scoring for its views (``view(name)``), and as its ``train`` view itself.
    The caller owns ray.init (the driver's start_ray).

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
        workers = [worker_spec(s.name, s.kwargs, r) for s, r in zip(self.specs, loaded)]
        self.options = {"timeout_s": timeout_s, "strict": strict, "max_workers": max_workers}
        threads = str(threads_per_actor or max(1, int(cpus_per_actor)))
        transport = RayTransport(
            RewardActor,
            (workers, [s.weight for s in self.specs], {**self.options, "isolation": isolation}),
            {"num_cpus": cpus_per_actor, "runtime_env": {"env_vars": dict.fromkeys(THREAD_VARS, threads)}},
        )
        policy = SlotPolicy("reward actor", start_timeout_s, max_restarts, restart_window_s, keys="reward")
        self.num_actors, self.grace_s, self.chunk_size = num_actors, grace_s, chunk_size
        self.stop_error_fraction, self.start_timeout_s = stop_error_fraction, start_timeout_s
        self._supervisor: Supervisor[Any, _Chunk]
        self._supervisor = Supervisor(transport, policy, num_actors, self._on_restart)
        self._lock = threading.RLock()
        self._queue: deque[_Chunk] = deque()
        self._ready: dict[int, Any] = {}  # slot -> the readiness call of its latest restart (its pid)
        self._views: dict[str, PoolView] = {}
        self._closed = False
        self._supervisor.start()  # a slot that cannot start stops here, with every actor killed
        try:
            self._pids: list[int] = self._supervisor.call_all(_ready_remote, start_timeout_s, "ready")
        except BaseException:
            self._supervisor.shutdown()
            raise

    def view(self, name: str = "train") -> PoolView:
        """The view called `name` (made on first use): a Scorer on these actors with its own counters."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardActorPool: view() after close()")
            return self._views.setdefault(name, PoolView(self, name))

    def submit(self, inputs: list[RewardInput]) -> ScoreHandle:
        return self.view("train").submit(inputs)

    def result(self, handle: ScoreHandle) -> list[RewardResult]:
        return self.view("train").result(handle)

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]:
        return self.view("train").score(inputs)

    def metrics(self) -> dict[str, float]:
        return self.view("train").metrics()

    def actors(self) -> list[tuple[Any, int]]:
        """(Ray actor handle, process id) of each actor, by slot; waits for restarts in progress."""
        import ray

        with self._lock:
            self._supervisor.settle()
            for slot, ref in list(self._ready.items()):
                self._pids[slot] = ray.get(ref)
            self._ready.clear()
            return list(zip(self._supervisor.handles, self._pids))

    def close(self) -> None:
        """Stops the actors; every view's submit() afterwards raises. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for view in self._views.values():
                view.closed = True
            self._supervisor.shutdown(close=lambda a: a.close.remote(), grace_s=2.0)

    def __enter__(self) -> RewardActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ internals

    def _on_restart(self, slot: int, actor: Any) -> Any:
        self._ready[slot] = ref = _ready_remote(actor)
        return ref

    def _view_closed(self) -> None:
        with self._lock:
            if self._views and all(v.closed for v in self._views.values()):
                self.close()

    def _submit(self, view: PoolView, inputs: list[RewardInput]) -> PoolHandle:
        if view.closed or self._closed:
            raise RuntimeError(f"RewardActorPool: submit() after close() (view {view.name!r})")
        handle = PoolHandle(view, len(inputs))
        size = self.chunk_size or max(1, math.ceil(len(inputs) / self.num_actors))
        handle.chunks = [_Chunk(handle, i, list(inputs[i : i + size])) for i in range(0, len(inputs), size)]
        with self._lock:
            self._queue.extend(handle.chunks)
            self._dispatch()
        return handle

    def _result(self, handle: PoolHandle) -> list[RewardResult]:
        try:
            self._wait_for(handle)
        except BaseException:
            self._abandon(handle)
            raise
        if handle.error is not None:
            self._abandon(handle)
            raise handle.error
        outcomes = [c.outcome for c in handle.chunks if c.outcome is not None]
        self._stop_if_broken(handle, outcomes)
        view = handle.view
        with self._lock:
            view._events.update(handle.events)
            for outcome in outcomes:
                view._counts.update(outcome.counts)
                view._sums.update(outcome.sums)
            view._counts["reward/samples"] += 0  # present even for an empty call, as in RewardScorer
        return [r for outcome in outcomes for r in outcome.results]

    def _allowance(self, chunk: _Chunk) -> float:
        """Seconds a chunk may take: every task its timeout, max_workers at a time, plus grace_s."""
        waves = math.ceil(len(chunk.inputs) * len(self.specs) / self.options["max_workers"])
        return self.grace_s + self.options["timeout_s"] * waves

    def _dispatch(self) -> None:
        """Every idle actor takes the next waiting chunk (slots left on abandoned chunks are replaced)."""
        self._supervisor.replace_dirty()
        for slot in self._supervisor.idle_slots():
            if not self._queue:
                return
            chunk = self._queue.popleft()
            allowance = self._allowance(chunk)
            how = f"{allowance:g} s (its chunk of {len(chunk.inputs)} samples)"
            self._supervisor.submit(slot, chunk, _score_remote, allowance, how)

    def _wait_for(self, handle: PoolHandle) -> None:
        """Runs the pool until `handle` is done (other handles' chunks progress too). The lock is taken per
        short wait, so another thread's submit() or result() is not held up behind this one."""
        while True:
            with self._lock:
                if handle.done:
                    return
                if self._closed:
                    raise RuntimeError("RewardActorPool: closed while a result was awaited")
                self._dispatch()
                if not self._supervisor.calls and not self._supervisor.starting:  # an earlier error lost it
                    raise RuntimeError("RewardActorPool: a chunk of this call is neither queued nor running")
                for outcome in self._supervisor.wait(0.2):
                    self._settle(outcome)
            time.sleep(0)  # lets a thread blocked on the lock take it

    def _settle(self, outcome: Outcome[_Chunk]) -> None:
        chunk, slot = outcome.call.work, outcome.call.slot
        if outcome.ok:
            chunk.outcome = outcome.value
            self._pids[slot] = outcome.value.pid
        elif outcome.error is not None:  # the actor's scorer raised (reward.strict): the call stops with it
            cause = outcome.error
            error = RewardError(f"reward actor {slot}, on the chunk from sample {chunk.start}: {cause}")
            error.__cause__, chunk.handle.error = cause, error
        else:  # it died or missed its deadline: the supervisor is replacing it; the chunk goes again
            chunk.handle.events["actor_restarts"] += 1
            chunk.handle.events["actor_timeouts"] += int(outcome.timed_out)
            self._queue.appendleft(chunk)

    def _abandon(self, handle: PoolHandle) -> None:
        """After an aborted wait: `handle`'s queued chunks are dropped, and actors scoring them are replaced
        before their next chunk (so that one is not timed while queued behind stale work)."""
        with self._lock:
            self._queue = deque(c for c in self._queue if c.handle is not handle)
            for slot, call in list(self._supervisor.calls.items()):
                if call.work.handle is handle:
                    self._supervisor.abandon(slot)

    def _stop_if_broken(self, handle: PoolHandle, outcomes: list[ChunkOutcome]) -> None:
        """RewardScorer's rule over the whole call: this fraction of its samples failed or timed out."""
        failed = sum(len(o.failed) for o in outcomes)
        if not handle.size or failed < self.stop_error_fraction * handle.size:
            return
        chunk, outcome = next((c, o) for c, o in zip(handle.chunks, outcomes) if o.first_failure)
        assert outcome.first_failure is not None
        name, index, prompt, completion, trace = outcome.first_failure
        raise RewardError(
            f"reward {name!r} failed on {failed} of {handle.size} samples "
            f"(reward.stop_error_fraction={self.stop_error_fraction}); "
            f"first failure, on sample {chunk.start + index} "
            f"(prompt {prompt!r}, completion {completion!r}):\n{trace}"
        )
