"""Reward worker processes: a reward plugin that hangs or crashes costs its sample and its worker, never the
driver.

Each worker loads the rewards itself from their specs (a built-in name, ``pkg.mod:fn`` or ``file.py:fn``,
resolved in the child as anywhere: :mod:`cispo.core.registry`), then scores the tasks it is sent in order,
one result message per task. The parent (:class:`WorkerPool`) keeps ``size`` workers, sends each idle one a
batch, and times each task from the moment the previous result arrived: a task past ``timeout_s`` gets its
worker SIGKILLed, together with the worker's process group (so a plugin's own subprocesses go too), and
replaced; the rest of its batch goes to other workers. A worker that dies (a segfault, ``os._exit``) fails
only the task it was running.

Workers start with multiprocessing's ``forkserver`` method: a fresh single-threaded server forks them, never
the driver, whose Ray, torch and gRPC threads a plain fork would copy in an unknown state. The server
preloads this module and the built-in rewards (math-verify and sympy take most of a second to import), so a
replacement is ready in about the time its plugin modules take to import. A worker dies with its parent.

A reward's exception comes back as its type name, message and formatted traceback, plus the exception
itself when it survives a pickle round trip (else :class:`RemoteRewardError` stands in for it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours, so ours (last in, first out) runs first
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from cispo.core.registry import import_path
from rewards.base import RewardError, RewardInput, RewardResult, adapt_reward_fn
from rewards.registry import REWARDS, LoadedReward, callable_from

LOAD_TIMEOUT_S = 300.0  # a worker that has not loaded its rewards by then is a configuration error
MAX_BATCH = 32  # tasks per message: amortises the round trip, keeps the load spread over the workers
# "__main__" is multiprocessing's default; cispo.core.launch pins our package names before `rewards` is
# imported, so a user's rewards.py in the launch directory (on the inherited sys.path) cannot replace it.
PRELOAD = ["__main__", "cispo.core.launch", "rewards.workers", "rewards.builtin"]
_HINT = (
    "a reward worker process loads each reward by name or path itself: a reward registered only in the "
    "driver (a lambda, a closure, a function defined in __main__) must move to a module named as "
    "'pkg.mod:fn' or 'path/to/file.py:fn', or run with reward.isolation=thread"
)


@dataclass
class Task:
    """One (sample, reward) pair and its outcome: a result, an error (and its traceback) or a timeout."""

    index: int
    spec: int
    inp: RewardInput
    key: int = -1
    started: float | None = None
    done: bool = False
    timed_out: bool = False
    result: RewardResult | None = None
    error: BaseException | None = None
    error_type: str = ""
    trace: str = ""

    def fail(self, error: BaseException, type_name: str = "", trace: str = "") -> None:
        self.error, self.done = error, True
        self.error_type = type_name or type(error).__name__
        self.trace = trace or "".join(traceback.format_exception(error)).rstrip()


class RemoteRewardError(RewardError):
    """A reward's exception that could not travel back from its worker as itself, or the worker's death."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name, self.message = type_name, message

    def __repr__(self) -> str:
        return f"{self.type_name}({self.message!r})"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load one reward: the configured name (for messages), the name or path it
    resolves there, the keyword arguments, and the score range the driver's registry gave it."""

    name: str
    path: str
    kwargs: dict
    low: float
    high: float


def worker_spec(name: str, kwargs: dict, loaded: LoadedReward) -> WorkerSpec:
    """A path that finds in a fresh process the function ``name`` resolves to here (a name registered here
    by a module the driver imported is unknown there); the name itself when no such path exists."""
    try:
        pickle.dumps(kwargs)
    except Exception as err:
        raise ValueError(f"reward {name!r}: kwargs cannot be sent to a reward worker ({err})") from err
    path = name
    fn = REWARDS.get(name) if ":" not in name else None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        file = getattr(sys.modules.get(module), "__file__", None)
        where = file if module.startswith("cispo_plugin_") and file else module  # a file plugin: by its path
        candidate = f"{where}:{qualname}"
        try:
            path = candidate if import_path(candidate, "reward") is fn else name
        except ValueError:
            pass
    return WorkerSpec(name, path, dict(kwargs), loaded.low, loaded.high)


def pack_input(inp: RewardInput) -> bytes:
    """The pickled input; RewardError naming the field or metadata key that cannot be pickled."""
    try:
        return pickle.dumps(inp, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        parts = [(f"metadata[{k!r}]", v) for k, v in inp.metadata.items()]
        parts += [("reference", inp.reference), ("prompt", inp.prompt), ("completion", inp.completion)]
        for where, value in parts:
            try:
                pickle.dumps(value)
            except Exception:
                what = f"RewardInput.{where} ({type(value).__name__})"
                break
        else:
            what = "RewardInput"
        raise RewardError(
            f"{what} cannot be sent to a reward worker process ({err}); give picklable values "
            "(str, numbers, lists, dicts) or run with reward.isolation=thread"
        ) from err


# ---------------------------------------------------------------------------------------------- the worker


def _die_with_parent() -> None:
    """SIGKILL when the forkserver (which exits with the driver) goes; Linux only, best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(0)


def _failure(error: BaseException) -> tuple[str, str, str, bytes | None]:
    trace = "".join(traceback.format_exception(error)).rstrip()
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ still leaves the type and the traceback
        message = f"<unprintable {type(error).__name__}>"
    try:
        data: bytes | None = pickle.dumps(error)
        pickle.loads(data)  # a custom __init__ can make an exception pickle but not unpickle
    except BaseException:  # noqa: BLE001
        data = None
    return type(error).__name__, message, trace, data


def _score_one(rewards: list[LoadedReward], key: int, spec: int, data: bytes) -> bytes:
    try:
        return pickle.dumps(("done", key, rewards[spec](pickle.loads(data)), None))
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from a plugin too
        return pickle.dumps(("done", key, None, _failure(e)))


def _load(spec: WorkerSpec) -> LoadedReward:
    fn = callable_from(REWARDS, spec.path)
    return LoadedReward(spec.name, adapt_reward_fn(fn, spec.name, spec.kwargs), spec.low, spec.high)


def worker_main(conn: Connection, specs: list[WorkerSpec], env: dict[str, str], orphan_kill: bool) -> None:
    """A worker's life: load the rewards, say ready, then score batches until told to stop (None) or EOF."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group: a kill on timeout takes the plugin's subprocesses with it
    if orphan_kill:
        _die_with_parent()
    for name in set(os.environ) - set(env):  # a forkserver child inherits the server's environment
        del os.environ[name]
    os.environ.update(env)
    try:
        rewards = [_load(s) for s in specs]
    except BaseException as e:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("load_error", "".join(traceback.format_exception(e)).rstrip())))
        return
    conn.send_bytes(pickle.dumps(("ready",)))
    while True:
        try:
            batch = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for key, spec, data in batch:
            conn.send_bytes(_score_one(rewards, key, spec, data))


# ---------------------------------------------------------------------------------------------- the parent


@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Connection
    born: float
    ready: bool = False
    tasks: deque[Task] = field(default_factory=deque)  # sent, in order; the first one is running
    since: float = 0.0  # when the running task began


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}" if code is not None else "its pipe closed"


def _kill(worker: _Worker) -> None:
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # not yet its own group leader, or gone already
    if worker.proc.exitcode is None:
        worker.proc.kill()
    worker.proc.join(10)
    worker.conn.close()
    if worker.proc.exitcode is not None:
        worker.proc.close()


def _stop_all(workers: list[_Worker]) -> None:
    """Idle workers are asked to exit (a plugin's atexit cleanup runs); the rest, and laggards, are killed."""
    idle = [w for w in workers if w.ready and not w.tasks]
    for w in idle:
        with contextlib.suppress(OSError):
            w.conn.send_bytes(pickle.dumps(None))
    deadline = time.monotonic() + 2.0
    for w in idle:
        w.proc.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        _kill(w)
    workers.clear()


_LIVE: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
atexit.register(lambda: [pool.close() for pool in list(_LIVE)])


class WorkerPool:
    """``size`` reward worker processes; ``run(tasks)`` fills in each task's result, error or timeout."""

    def __init__(self, specs: list[WorkerSpec], *, size: int, timeout_s: float) -> None:
        self.specs, self.size, self.timeout_s = list(specs), size, timeout_s
        method = _start_method()
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(PRELOAD)  # takes effect only if the server is not running yet
        self._orphan_kill = method == "forkserver"  # the parent is then the server, not a driver thread
        self._workers: list[_Worker] = []
        self._pending: deque[Task] = deque()
        self._keys = 0
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self._finalizer.atexit = False  # the module's atexit hook closes live pools before multiprocessing's
        _LIVE.add(self)
        self._fill()
        while not all(w.ready for w in self._workers):  # load errors surface here, at construction
            self._poll(self._wake())
            self._check_loading()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        self._finalizer()

    def run(self, tasks: list[Task]) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("WorkerPool: run() after close()")
        for t in tasks:
            t.key, self._keys = self._keys, self._keys + 1
        self._pending = deque(tasks)
        payloads: dict[int, bytes | RewardError] = {}
        try:
            while self._pending or any(w.tasks for w in self._workers):
                self._fill()
                self._dispatch(payloads)
                self._poll(self._wake())
                self._expire()
                self._check_loading()
        finally:
            for w in [w for w in self._workers if w.tasks]:  # an exception or interrupt: stale tasks
                self._retire(w)
            self._pending.clear()
        self._fill()  # replaces the workers the last timeouts killed: the pool is whole between calls

    def _fill(self) -> None:
        while len(self._workers) < self.size:
            parent, child = self._ctx.Pipe()
            args = (child, self.specs, dict(os.environ), self._orphan_kill)
            proc = self._ctx.Process(target=worker_main, args=args, name="reward-worker", daemon=False)
            proc.start()
            child.close()
            self._workers.append(_Worker(proc, parent, time.monotonic()))

    def _retire(self, worker: _Worker) -> None:
        _kill(worker)
        self._workers.remove(worker)

    def _batch(self, payloads: dict[int, bytes | RewardError]) -> list[Task]:
        size = min(MAX_BATCH, max(1, len(self._pending) // (2 * self.size)))
        batch: list[Task] = []
        while self._pending and len(batch) < size:
            t = self._pending.popleft()
            if t.index not in payloads:
                try:
                    payloads[t.index] = pack_input(t.inp)
                except RewardError as err:
                    payloads[t.index] = err
            packed = payloads[t.index]
            if isinstance(packed, RewardError):
                t.fail(packed)
            else:
                batch.append(t)
        return batch

    def _dispatch(self, payloads: dict[int, bytes | RewardError]) -> None:
        for w in list(self._workers):
            if not self._pending:
                return
            if not w.ready or w.tasks:
                continue
            batch = self._batch(payloads)
            if not batch:
                continue
            message = pickle.dumps([(t.key, t.spec, payloads[t.index]) for t in batch])
            try:
                w.conn.send_bytes(message)  # an idle worker is blocked in recv: this does not stall
            except OSError:
                self._pending.extendleft(reversed(batch))
                self._died(w)
                continue
            w.tasks.extend(batch)
            w.since = time.monotonic()

    def _wake(self) -> float:
        now = time.monotonic()
        ends = [w.since + self.timeout_s for w in self._workers if w.tasks]
        ends += [w.born + LOAD_TIMEOUT_S for w in self._workers if not w.ready]
        return min(1.0, max(0.0, min(ends, default=now + 1.0) - now))

    def _poll(self, timeout: float) -> None:
        owners: dict[Any, _Worker] = {}
        for w in self._workers:
            owners[w.conn] = owners[w.proc.sentinel] = w
        ready = wait(list(owners), timeout)
        for w in dict.fromkeys(owners[r] for r in ready):
            try:
                while w.conn.poll():
                    self._receive(w, w.conn.recv_bytes())
            except (EOFError, OSError):
                self._died(w)
                continue
            if w.proc.exitcode is not None:
                self._died(w)

    def _receive(self, w: _Worker, data: bytes) -> None:
        try:
            message = pickle.loads(data)
        except Exception as err:  # noqa: BLE001 - e.g. a reason of a class the driver cannot import
            message = ("done", w.tasks[0].key, None, _failure(err))
        if message[0] == "ready":
            w.ready = True
            return
        if message[0] == "load_error":
            raise RewardError(f"a reward worker could not load the rewards ({_HINT}):\n{message[1]}")
        _, key, result, failure = message
        t = w.tasks.popleft()
        assert t.key == key, f"reward worker answered task {key}, expected {t.key}"
        w.since = time.monotonic()
        if failure is None:
            t.result, t.done = result, True
            return
        type_name, text, trace, pickled = failure
        try:
            error = pickle.loads(pickled) if pickled is not None else RemoteRewardError(type_name, text)
        except Exception:  # noqa: BLE001
            error = RemoteRewardError(type_name, text)
        t.fail(error, type_name, trace)

    def _died(self, w: _Worker) -> None:
        """A worker that exited on its own: its running task failed, the rest of its batch is sent again."""
        if w not in self._workers:
            return
        w.proc.join(1.0)  # its pipe closed: the exit status follows at once
        how = _describe_exit(w.proc.exitcode)
        self._retire(w)
        if not w.ready:
            raise RewardError(f"a reward worker exited ({how}) while loading the rewards ({_HINT})")
        if w.tasks:
            t = w.tasks.popleft()
            died = RemoteRewardError("WorkerDied", f"the reward worker process died ({how}) on this sample")
            t.fail(died, "WorkerDied")
            self._pending.extendleft(reversed(w.tasks))
            w.tasks.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for w in [w for w in self._workers if w.tasks and now - w.since > self.timeout_s]:
            t = w.tasks.popleft()
            t.timed_out = t.done = True
            self._pending.extendleft(reversed(w.tasks))
            w.tasks.clear()
            self._retire(w)

    def _check_loading(self) -> None:
        now = time.monotonic()
        if any(not w.ready and now - w.born > LOAD_TIMEOUT_S for w in self._workers):
            raise RewardError(f"a reward worker did not load the rewards within {LOAD_TIMEOUT_S:.0f}s")
