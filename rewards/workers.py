"""Reward worker processes: a reward plugin that hangs or crashes costs its sample and its worker, never the
driver.

Each worker is a slot of a :class:`~cispo.core.supervisor.Supervisor` on a
:class:`~cispo.core.process_slots.ProcessTransport`: a process that loads the rewards itself from their specs
(a built-in name, ``pkg.mod:fn`` or ``file.py:fn``, resolved in the child as anywhere:
:mod:`cispo.core.registry`) and then scores one (sample, reward) task per request. :class:`WorkerPool` keeps
``size`` workers and gives each idle one the next task, due within ``timeout_s``: a task past it is marked
timed out, and the supervisor SIGKILLs its worker, with the worker's process group (so a plugin's own
subprocesses go too), and starts another. A worker that dies (a segfault, ``os._exit``) fails only the task
it was running (``WorkerDied``). A hanging plugin costs its sample, never the run: the restart budget is
unlimited.

Workers start from multiprocessing's ``forkserver``, which preloads this module and the built-in rewards
(math-verify and sympy take most of a second to import), so a replacement is ready in about the time its
plugin modules take to import. A worker dies with its parent.

A reward's exception comes back as its type name, message and formatted traceback, plus the exception
itself when it survives a pickle round trip (else :class:`RemoteRewardError` stands in for it).
"""

from __future__ import annotations

import functools
import pickle
import sys
import traceback
from collections import deque
from dataclasses import dataclass

from cispo.core.process_slots import ProcessHandle, ProcessTransport, RemoteError, Unsendable
from cispo.core.registry import import_path
from cispo.core.supervisor import Outcome, SlotDied, SlotPolicy, Supervisor
from rewards.base import RewardError, RewardInput, RewardResult, adapt_reward_fn
from rewards.registry import REWARDS, LoadedReward, callable_from

LOAD_TIMEOUT_S = 300.0  # a worker that has not loaded its rewards by then is a configuration error
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


def unsendable(inp: RewardInput, err: BaseException) -> RewardError:
    """RewardError naming the field or metadata key of `inp` that cannot be pickled."""
    parts = [(f"metadata[{k!r}]", v) for k, v in inp.metadata.items()]
    parts += [("reference", inp.reference), ("prompt", inp.prompt), ("completion", inp.completion)]
    what = "RewardInput"
    for where, value in parts:
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - any pickling failure names the field
            what = f"RewardInput.{where} ({type(value).__name__})"
            break
    return RewardError(
        f"{what} cannot be sent to a reward worker process ({err}); give picklable values "
        "(str, numbers, lists, dicts) or run with reward.isolation=thread"
    )


# ---------------------------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class ScoreRequest:
    """One task for a worker: reward `spec` (its index in the worker's list) on `inp`."""

    spec: int
    inp: RewardInput


class RewardServer:
    """What a worker process serves: its rewards, loaded in the process from their specs."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.rewards = [_load(s) for s in specs]

    def handle(self, request: ScoreRequest) -> RewardResult:
        return self.rewards[request.spec](request.inp)


def _load(spec: WorkerSpec) -> LoadedReward:
    fn = callable_from(REWARDS, spec.path)
    return LoadedReward(spec.name, adapt_reward_fn(fn, spec.name, spec.kwargs), spec.low, spec.high)


# ---------------------------------------------------------------------------------------------- the parent


class WorkerPool:
    """``size`` reward worker processes; ``run(tasks)`` fills in each task's result, error or timeout. One
    caller at a time (RewardScorer holds a lock)."""

    def __init__(self, specs: list[WorkerSpec], *, size: int, timeout_s: float) -> None:
        self.specs, self.size, self.timeout_s = list(specs), size, timeout_s
        factory = functools.partial(RewardServer, self.specs)
        self.transport = ProcessTransport(factory, name="reward worker", preload=PRELOAD)
        policy = SlotPolicy("reward worker", LOAD_TIMEOUT_S, max_restarts=None, keys="reward")
        self.supervisor: Supervisor[ProcessHandle, Task] = Supervisor(self.transport, policy, size)
        self._closed = False
        try:
            self.supervisor.start()  # load errors surface here, at construction
        except RuntimeError as err:
            self.transport.close()
            raise RewardError(f"reward workers could not load the rewards ({_HINT}):\n{err}") from err

    def pids(self) -> list[int]:
        return [h.pid for h in self.supervisor.handles]

    def close(self) -> None:
        self._closed = True
        self.transport.close()

    def run(self, tasks: list[Task]) -> None:
        if self._closed:
            raise RuntimeError("WorkerPool: run() after close()")
        pending = deque(tasks)
        try:
            while pending or self.supervisor.calls:
                for slot in self.supervisor.idle_slots():
                    if pending:
                        self._submit(slot, pending.popleft(), pending)
                for outcome in self.supervisor.wait(1.0):
                    _settle(outcome)
        finally:
            for slot in list(self.supervisor.calls):  # an exception or interrupt: stale tasks
                self.supervisor.abandon(slot)
            self.supervisor.replace_dirty()

    def _submit(self, slot: int, t: Task, pending: deque[Task]) -> None:
        try:
            self.supervisor.submit(slot, t, self._send, self.timeout_s, how=f"{self.timeout_s:g} s")
        except Unsendable as err:
            t.fail(unsendable(t.inp, err.__cause__ or err))
        except SlotDied as err:  # it exited while idle: its replacement takes the task
            pending.appendleft(t)
            self.supervisor.restart(slot, str(err))

    def _send(self, handle: ProcessHandle, t: Task) -> object:
        return self.transport.call(handle, ScoreRequest(t.spec, t.inp))


def _settle(outcome: Outcome[Task]) -> None:
    """Fills in the outcome's task: its result, the reward's error, its timeout or its worker's death."""
    t = outcome.call.work
    if outcome.ok:
        t.result, t.done = outcome.value, True
    elif outcome.timed_out:
        t.timed_out = t.done = True
    elif outcome.failure:
        how = outcome.failure.removeprefix("died: ")
        died = RemoteRewardError("WorkerDied", f"the reward worker process died ({how}) on this sample")
        t.fail(died, "WorkerDied")
    elif isinstance(outcome.error, RemoteError):
        err = outcome.error
        t.fail(err.error or RemoteRewardError(err.type_name, err.message), err.type_name, err.trace)
    else:
        assert outcome.error is not None
        t.fail(outcome.error)
