"""Score batches with several weighted rewards, a per-sample timeout and failure metrics.

Rewards run in worker processes by default (``isolation="process"``, :mod:`rewards.workers`): a task past
the timeout gets its worker killed and replaced, so a hanging plugin costs at most its timeout per sample and
leaves nothing running. ``isolation="thread"`` runs them on daemon threads in this process instead (cheaper
to start, and for rewards registered only in the driver); a timed-out thread cannot be stopped: it is
abandoned, still running, and replaced.

Every scorer (this in-driver one, and the views of the Ray actor pool, :mod:`rewards.actor_pool`) is a
:class:`Scorer`: ``submit(inputs)`` starts a call and returns at once, ``result(handle)`` waits for it,
``score(inputs)`` is both. Counters: ``metrics()`` reports the calls whose results were taken (``score``,
``result``) since the previous ``metrics()``; a call's counters are added when its result is taken, never
while it runs, so ``metrics()`` right after ``result(h)`` reflects exactly that call when the previous one was
taken before the previous ``metrics()`` (what a stream scoring group by group needs to attribute counters).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from rewards.base import RewardError, RewardInput, RewardResult, RewardTimeout
from rewards.batch import BatchReward, batch_reward, run_batch
from rewards.registry import LoadedReward, load_reward, metric_keys
from rewards.workers import Task, WorkerPool, worker_spec

ISOLATIONS = ("process", "thread")


@dataclass
class RewardSpec:
    """One reward in the mix: registered name, ``pkg.mod:fn`` or ``file.py:fn``, its weight, its keyword
    arguments, and its score range when it overrides the declared one (``low``/``high``; None: declared)."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    low: float | None = None
    high: float | None = None


class ScoreHandle:
    """What ``Scorer.submit`` returns; ``Scorer.result`` takes it once (a second time raises ValueError)."""

    taken: bool = False


class Scorer(Protocol):
    """The scorer seam: in the driver (RewardScorer) or on Ray reward actors (RewardActorPool's views)."""

    def submit(self, inputs: list[RewardInput]) -> ScoreHandle: ...

    def result(self, handle: ScoreHandle) -> list[RewardResult]: ...

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


@dataclass
class ScoredBatch:
    """One call's results and its own counters (added to the scorer's when the results are taken)."""

    results: list[RewardResult]
    counts: Counter[str] = field(default_factory=Counter)
    sums: Counter[str] = field(default_factory=Counter)


@dataclass(eq=False)
class _Submitted(ScoreHandle):
    owner: RewardScorer
    future: Future[ScoredBatch]


def timed_out(t: Task) -> bool:
    """Past the scorer's timeout, or a reward that reported running out of its own time (RewardTimeout)."""
    return t.timed_out or isinstance(t.error, RewardTimeout) or t.error_type == "RewardTimeout"


def failure(t: Task, timeout_s: float) -> str:
    """What went wrong with a failed task, with its traceback when it raised."""
    if t.timed_out:
        return f"timed out after {timeout_s}s (reward.timeout_s)"
    return t.trace


class _ThreadPool:
    """``isolation="thread"``: daemon threads, so a reward stuck in C code cannot block interpreter exit."""

    def __init__(self, rewards: list[LoadedReward], *, size: int, timeout_s: float) -> None:
        self.rewards, self.size, self.timeout_s = rewards, size, timeout_s
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._cond = threading.Condition()
        self._workers = 0
        self._fill()

    def _fill(self) -> None:
        while self._workers < self.size:
            self._workers += 1
            threading.Thread(target=self._work, daemon=True, name="reward-worker").start()

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            with self._cond:
                task.started = time.monotonic()
            try:
                result, error = self.rewards[task.spec](task.inp), None
            except BaseException as e:  # noqa: BLE001 - any plugin failure becomes a reason, not a crash
                result, error = None, e
            with self._cond:
                if task.timed_out:
                    return  # replaced by a fresh worker when it timed out; leave the pool size unchanged
                if error is not None:
                    task.fail(error)
                task.result, task.done = result, True
                self._cond.notify_all()

    def run(self, tasks: list[Task]) -> None:
        for t in tasks:
            self._queue.put(t)
        with self._cond:
            while pending := [t for t in tasks if not t.done]:
                now = time.monotonic()
                for t in pending:
                    if t.started is not None and now - t.started > self.timeout_s:
                        t.timed_out = t.done = True
                        self._workers -= 1
                self._fill()
                running = [t.started for t in pending if t.started is not None and not t.done]
                wake = min((s + self.timeout_s - now for s in running), default=self.timeout_s)
                self._cond.wait(timeout=max(0.01, min(wake, 1.0)))

    def close(self) -> None:
        for _ in range(self._workers):
            self._queue.put(None)  # idle threads exit; abandoned ones are past saving


class RewardScorer:
    """``score(inputs)`` returns one combined RewardResult per input: ``sum(weight_i * score_i)``.

    Holds worker processes: ``close()`` it (or use it as a context manager); garbage collection and
    interpreter exit close it too.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        *,
        timeout_s: float = 10.0,
        strict: bool = False,
        max_workers: int = 2,
        stop_error_fraction: float = 1.0,
        isolation: str = "process",
    ) -> None:
        """stop_error_fraction: when at least this fraction of one score() call's samples hit a reward
        that raised or timed out, score() raises RewardError with the first failure's traceback and sample
        (1.0: only when every sample failed; a plugin broken on every input, or one that never finishes in
        time, must not train on zero rewards)."""
        if not specs:
            raise ValueError("RewardScorer: at least one RewardSpec is needed")
        if max_workers < 1:
            raise ValueError(f"RewardScorer: max_workers must be >= 1, got {max_workers}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"RewardScorer: isolation must be one of {list(ISOLATIONS)}, got {isolation!r}")
        self.specs = list(specs)
        # Loaded here too, so an unknown name or a bad signature fails at construction with its own error.
        self.rewards: list[LoadedReward] = [
            load_reward(s.name, s.kwargs, low=s.low, high=s.high) for s in self.specs
        ]
        self.keys = metric_keys([s.name for s in self.specs])  # reward/<key>/...: short names, not paths
        # Rewards with score_batch (the generative judge) get each score() call's samples in one call.
        self._batched: dict[int, BatchReward] = {
            j: b for j, s in enumerate(self.specs) if (b := batch_reward(s.name)) is not None
        }
        self.timeout_s, self.strict, self.max_workers = timeout_s, strict, max_workers
        self.stop_error_fraction, self.isolation = stop_error_fraction, isolation
        self._pool: WorkerPool | _ThreadPool
        if isolation == "process":
            children = [worker_spec(s.name, s.kwargs, r) for s, r in zip(self.specs, self.rewards)]
            self._pool = WorkerPool(children, size=max_workers, timeout_s=timeout_s)
        else:
            self._pool = _ThreadPool(self.rewards, size=max_workers, timeout_s=timeout_s)
        self._lock = threading.Lock()  # one call at a time on the pool
        self._counter_lock = threading.Lock()
        self._closed = False
        self._counts: Counter[str] = Counter()
        self._sums: Counter[str] = Counter()
        self._background: ThreadPoolExecutor | None = None  # submit()'s one thread, started on first use

    def close(self) -> None:
        """Stops the workers (after a submitted call in progress ends); score() afterwards raises
        RuntimeError. Idempotent."""
        self._closed = True
        if self._background is not None:
            self._background.shutdown(wait=True, cancel_futures=True)
        self._pool.close()

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (none with isolation="thread")."""
        return self._pool.pids() if isinstance(self._pool, WorkerPool) else []

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, inputs: list[RewardInput]) -> ScoreHandle:
        """Starts scoring `inputs` on a background thread (calls run one at a time, in order) and returns
        at once; ``result(handle)`` waits for the results."""
        if self._closed:
            raise RuntimeError("RewardScorer: submit() after close()")
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="reward-scorer")
        return _Submitted(self, self._background.submit(self.score_batch, list(inputs)))

    def result(self, handle: ScoreHandle) -> list[RewardResult]:
        """The results of a submit(), as score() gives them (its exception, if it raised); taken once. Its
        counters are added now: see the module docstring."""
        if not isinstance(handle, _Submitted) or handle.owner is not self or handle.taken:
            raise ValueError("RewardScorer.result: a handle of another scorer, or one already taken")
        handle.taken = True
        return self._take(handle.future.result())

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]:
        """Combined results in input order; one failing sample or reward never loses the others."""
        if self._closed:
            raise RuntimeError("RewardScorer: score() after close()")
        return self._take(self.score_batch(inputs))

    def _take(self, scored: ScoredBatch) -> list[RewardResult]:
        with self._counter_lock:
            self._counts.update(scored.counts)
            self._sums.update(scored.sums)
        return scored.results

    def _resolve(self, t: Task, counts: Counter[str]) -> RewardResult:
        name, key = self.specs[t.spec].name, self.keys[t.spec]
        if timed_out(t):
            counts["reward/timeouts"] += 1
            counts[f"reward/{key}/timeouts"] += 1
            what = f"after {self.timeout_s}s" if t.timed_out else f"({str(t.error)[:120]})"
            if self.strict:
                raise RewardError(f"reward {name!r} timed out {what} on sample {t.index}") from t.error
            return RewardResult(0.0, f"{key}: timeout {what}")
        if t.error is not None:
            counts["reward/errors"] += 1
            counts[f"reward/{key}/errors"] += 1
            if self.strict:
                raise RewardError(f"reward {name!r} failed on sample {t.index}: {t.error!r}") from t.error
            return RewardResult(0.0, f"{key}: error {t.error_type}: {str(t.error)[:120]}")
        assert t.result is not None
        if t.result.score == 0.0 and t.result.reason:
            counts[f"reward/{key}/zero"] += 1
        return t.result

    def _stop_if_broken(self, tasks: list[Task], inputs: list[RewardInput]) -> None:
        """Errors and timeouts both count: a reward that always times out must not train on zeros. (In
        strict mode the first failure raises by itself, with its own message: _resolve.)"""
        if self.strict:
            return
        failed = sorted({t.index for t in tasks if t.error is not None or t.timed_out})
        if not inputs or len(failed) < self.stop_error_fraction * len(inputs):
            return
        first = next(t for t in tasks if t.error is not None or t.timed_out)
        timeouts = len({t.index for t in tasks if timed_out(t)})
        raise RewardError(
            f"reward {self.specs[first.spec].name!r} failed on {len(failed)} of {len(inputs)} samples "
            f"({timeouts} timed out; reward.stop_error_fraction={self.stop_error_fraction}); "
            f"first failure, on sample {first.index} "
            f"(prompt {first.inp.prompt[:200]!r}, completion {first.inp.completion[:200]!r}):\n"
            f"{failure(first, self.timeout_s)}"
        ) from first.error

    def score_batch(self, inputs: list[RewardInput]) -> ScoredBatch:
        """score()'s work: the results and this call's counters, which are not added to the scorer's."""
        tasks = [Task(i, j, inp) for i, inp in enumerate(inputs) for j in range(len(self.rewards))]
        with self._lock:
            self._pool.run([t for t in tasks if t.spec not in self._batched])
            for j, reward in self._batched.items():
                run_batch(reward, [t for t in tasks if t.spec == j], self.rewards[j], self.specs[j].kwargs)
        self._stop_if_broken(tasks, inputs)
        scored = ScoredBatch([])
        for i in range(len(inputs)):
            mine = tasks[i * len(self.rewards) : (i + 1) * len(self.rewards)]
            parts = [(t.spec, self._resolve(t, scored.counts)) for t in mine]
            total = sum(self.specs[j].weight * r.score for j, r in parts)
            reason = "; ".join(r.reason for _, r in parts if r.reason)
            scored.results.append(RewardResult(total, reason))
            for j, r in parts:
                scored.sums[f"reward/{self.keys[j]}/mean"] += r.score
        scored.counts["reward/samples"] += len(inputs)
        return scored

    def metrics(self) -> dict[str, float]:
        """Failure counts by reason (and per-reward means) since the previous call."""
        with self._counter_lock:
            out = counter_metrics(self._counts, self._sums)
            self._counts.clear()
            self._sums.clear()
        return out


def counter_metrics(counts: Counter[str], sums: Counter[str]) -> dict[str, float]:
    """The metrics of raw counters: counts as they are, sums as means over reward/samples."""
    n = counts.get("reward/samples", 0)
    out: dict[str, float] = {k: float(v) for k, v in counts.items()}
    out.update({k: v / n for k, v in sums.items()} if n else {})
    out.setdefault("reward/errors", 0.0)
    out.setdefault("reward/timeouts", 0.0)
    return out
