"""One supervisor for remote work: numbered slots, each holding one remote (a Ray actor, or a process).

Rollout workers, reward actors, reward worker processes and learner ranks are all slots of a `Supervisor`.
What it does, once for all of them:

- **start** every slot and wait for it to answer `ready`, within `SlotPolicy.start_timeout_s`;
- **calls with deadlines**: a slot runs at most one tracked call at a time; `wait()` hands back each call
  as an `Outcome` once it finished, raised, died or passed its deadline;
- **kill and restart**: a slot whose remote died or missed a deadline is killed and started again in the
  background (its `on_restart` call, e.g. "load the latest weights", is its readiness check); it takes no
  work until it is up;
- **a sliding-window restart budget** per slot (`RestartBudget`): `max_restarts` within any
  `restart_window_s` seconds (0: within the supervisor's life; None: unlimited). A window rather than a
  per-run count: a long run sees occasional deaths (a preempted node, a transient OOM) that a per-run budget
  would turn into a dead run after days, while a crash loop still spends its budget within minutes. Failed
  restarts count too. One restart more stops the run with a RuntimeError naming the slot and the keys;
- **resubmission** is the caller's choice: a failed `Outcome` carries its work item back, so a rollout
  group returns to the queue (any free slot takes it) and a reward task is marked timed out;
- **counters**: restarts, timeouts and deaths, since the last `take_events()` and over the life.

The transport (`Transport`) is all that differs between Ray actors (`RayTransport`, below) and processes
(`cispo.core.process_slots`). An exception raised by the remote's own code is not a failure of the slot:
it comes back in `Outcome.error` for the caller to raise (a broken reward plugin in strict mode, an engine
bug), and the slot stays as it is.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

H = TypeVar("H")  # a remote's handle
W = TypeVar("W")  # a call's work item (what a failed call gives back for resubmission)
EVENTS = ("restarts", "timeouts", "deaths")  # what take_events() counts
F = Any  # a transport's future (a Ray ObjectRef, a process call): opaque to the supervisor


class SlotDied(Exception):
    """The remote behind a slot is gone (its process died, was killed, or its node went away)."""


class StartFailed(Exception):
    """A remote cannot start at all (its code failed to load): a restart would fail the same way, so the
    supervisor raises instead of restarting (with an unlimited budget it would retry forever)."""


class Transport(Protocol[H]):
    """How a supervisor starts, calls and kills remotes of one kind."""

    def start(self, slot: int) -> H: ...

    def ready(self, handle: H) -> F: ...

    def wait(self, futures: Sequence[F], timeout_s: float) -> list[F]:
        """Those of `futures` that are done, waiting at most `timeout_s` for the first one."""
        ...

    def get(self, future: F) -> Any:
        """The value of a done future; SlotDied when its remote died; the remote's own exception else."""
        ...

    def kill(self, handle: H) -> None: ...


@dataclass(frozen=True)
class SlotPolicy:
    """How a kind of slot is supervised. `keys` is the config prefix messages name (``rollout`` ->
    ``rollout.max_restarts``); `max_restarts` None: unlimited (a reward worker killed for a hanging plugin
    costs its sample, not the run)."""

    role: str
    start_timeout_s: float
    max_restarts: int | None = 3
    restart_window_s: float = 3600.0
    keys: str = ""

    def __post_init__(self) -> None:
        if self.start_timeout_s <= 0:
            raise ValueError(f"{self.role}: start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise ValueError(f"{self.role}: max_restarts must be >= 0, got {self.max_restarts}")
        if self.restart_window_s < 0:
            raise ValueError(f"{self.role}: restart_window_s must be >= 0, got {self.restart_window_s}")

    def key(self, name: str) -> str:
        return f"{self.keys}.{name}" if self.keys else name


class RestartBudget:
    """Restarts per slot within a sliding window; `charge` raises once a slot's budget is spent."""

    def __init__(self, policy: SlotPolicy, num_slots: int, clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        self._times: list[deque[float]] = [deque() for _ in range(num_slots)]
        self.restarts = [0] * num_slots  # per slot, over the life

    def charge(self, slot: int, why: str) -> None:
        p, now, times = self.policy, self.clock(), self._times[slot]
        if p.max_restarts is None:
            self.restarts[slot] += 1
            return
        while p.restart_window_s and times and times[0] <= now - p.restart_window_s:
            times.popleft()
        if len(times) >= p.max_restarts:
            window = f"the last {p.restart_window_s:g} s" if p.restart_window_s else "this run"
            raise RuntimeError(
                f"{p.role} slot {slot} {why}, and its restart budget is spent: {len(times)} restart(s) in "
                f"{window} ({p.key('max_restarts')}={p.max_restarts} per {p.key('restart_window_s')}="
                f"{p.restart_window_s:g}; 0: per run)"
            )
        times.append(now)
        self.restarts[slot] += 1


@dataclass(eq=False)
class Call(Generic[W]):
    """One tracked call on one slot."""

    slot: int
    work: W
    future: F
    deadline: float
    submitted: float
    how: str  # how the deadline was chosen, for the message when it passes


@dataclass
class Outcome(Generic[W]):
    """A call that ended: `value` when it answered; `failure` (why) when its slot died or missed the
    deadline (the slot is being restarted); `error` when the remote's own code raised."""

    call: Call[W]
    value: Any = None
    failure: str = ""
    timed_out: bool = False
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failure and self.error is None


@dataclass(eq=False)
class _Starting:
    future: F
    deadline: float
    why: str  # why the slot is (re)starting, for the message if it fails again


@dataclass
class _Events:
    since: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)

    def count(self, event: str, n: int = 1) -> None:
        self.since[event] += n
        self.total[event] += n


class Supervisor(Generic[H, W]):
    """`num_slots` remotes of one kind; see the module docstring. Not thread-safe: one caller drives it."""

    def __init__(
        self,
        transport: Transport[H],
        policy: SlotPolicy,
        num_slots: int,
        on_restart: Callable[[int, H], F | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"{policy.role}: at least one slot is needed, got {num_slots}")
        self.transport, self.policy, self.clock = transport, policy, clock
        self.on_restart = on_restart
        self.budget = RestartBudget(policy, num_slots, clock)
        self.handles: list[H] = []
        self.calls: dict[int, Call[W]] = {}  # slot -> its running call
        self.starting: dict[int, _Starting] = {}  # slot -> its pending readiness check
        self.dirty: set[int] = set()  # slots whose call was abandoned: replaced before their next call
        self.events = _Events()
        self.num_slots = num_slots

    # ------------------------------------------------------------------------------------------ life

    def start(self) -> None:
        """Starts every slot and waits until each answers `ready`; a slot that fails stops everything."""
        self.handles = [self.transport.start(slot) for slot in range(self.num_slots)]
        futures = {slot: self.transport.ready(h) for slot, h in enumerate(self.handles)}
        key = self.policy.key("start_timeout_s")
        for slot, why in self._await(futures, self.policy.start_timeout_s, key).items():
            self.shutdown()
            raise RuntimeError(f"{self.policy.role} slot {slot} failed to start: {why}")

    def shutdown(self, close: Callable[[H], F] | None = None, grace_s: float = 2.0) -> None:
        """Asks idle remotes to `close` (within `grace_s`), then kills every remote."""
        if close is not None:
            idle = [close(h) for s, h in enumerate(self.handles) if s not in self.calls]
            if idle:
                try:
                    self.transport.wait(idle, grace_s)
                except Exception:  # noqa: BLE001 - a remote that cannot close is killed next anyway
                    pass
        for handle in self.handles:
            self.transport.kill(handle)
        self.handles, self.calls, self.starting = [], {}, {}

    # ------------------------------------------------------------------------------------------ calls

    def idle_slots(self) -> list[int]:
        """Slots that are up and running nothing."""
        return [
            s
            for s in range(len(self.handles))
            if s not in self.calls and s not in self.starting and s not in self.dirty
        ]

    def submit(
        self, slot: int, work: W, call: Callable[[H, W], F], timeout_s: float, how: str = ""
    ) -> Call[W]:
        """Runs `call(handle, work)` on an idle slot, due within `timeout_s` seconds from now."""
        if slot in self.calls or slot in self.starting or slot in self.dirty:
            raise RuntimeError(f"{self.policy.role} slot {slot} is not idle")
        now = self.clock()
        how = how or f"{timeout_s:g} s"
        tracked = Call(slot, work, call(self.handles[slot], work), now + timeout_s, now, how)
        self.calls[slot] = tracked
        return tracked

    def wait(self, timeout_s: float) -> list[Outcome[W]]:
        """Waits at most `timeout_s` (less, up to the nearest deadline) for calls to end; returns those
        that ended. Deadlines passed are failures (the slot restarts); restarts in progress advance."""
        self._expire_starting()
        futures = [c.future for c in self.calls.values()] + [s.future for s in self.starting.values()]
        deadlines = [c.deadline for c in self.calls.values()] + [s.deadline for s in self.starting.values()]
        if not futures:
            return []
        wait_s = max(0.0, min([timeout_s] + [d - self.clock() for d in deadlines]))
        done = set(self.transport.wait(futures, wait_s))
        self._check_starting_done(done)
        outcomes = [self._finish(c) for c in list(self.calls.values()) if c.future in done]
        now = self.clock()
        for c in [c for c in self.calls.values() if c.deadline <= now]:
            if self.transport.wait([c.future], 0.0):  # it answered after all
                outcomes.append(self._finish(c))
                continue
            del self.calls[c.slot]
            self.events.count("timeouts")
            why = f"did not answer within {c.how}"
            outcomes.append(Outcome(c, failure=why, timed_out=True, seconds=now - c.submitted))
            self.restart(c.slot, why)
        self._expire_starting()
        return outcomes

    def call_all(self, call: Callable[[H], F], timeout_s: float | None, what: str) -> list[Any]:
        """One call per slot, all of which must answer (ranks of one collective): the first death, error or
        missed deadline raises RuntimeError naming the slot (restarting one rank cannot help the others)."""
        return self.call_each(lambda _slot, handle: call(handle), timeout_s, what)

    def call_each(
        self,
        call: Callable[[int, H], F],
        timeout_s: float | None,
        what: str,
        slots: Sequence[int] | None = None,
    ) -> list[Any]:
        """call_all with the slot's index (per-slot arguments), on `slots` only when given; the results in
        the order of `slots`."""
        chosen = list(range(len(self.handles))) if slots is None else list(slots)
        futures = [call(slot, self.handles[slot]) for slot in chosen]
        index = {id(f): slot for slot, f in zip(chosen, futures)}
        pending = list(futures)
        deadline = None if timeout_s is None else self.clock() + timeout_s
        results: dict[int, Any] = {}
        while pending:
            left = 1e9 if deadline is None else max(0.0, deadline - self.clock())
            done = self.transport.wait(pending, left)
            if not done:
                self.events.count("timeouts")
                silent = sorted(index[id(f)] for f in pending)
                raise RuntimeError(
                    f"{self.policy.role} slot(s) {silent}: no answer to {what} within {timeout_s:g} s"
                )
            for future in done:
                pending = [f for f in pending if f is not future]
                slot = index[id(future)]
                try:
                    results[slot] = self.transport.get(future)
                except SlotDied as err:
                    self.events.count("deaths")
                    raise RuntimeError(f"{self.policy.role} {slot} died during {what}: {err}") from err
                except Exception as err:
                    raise RuntimeError(f"{self.policy.role} {slot} failed in {what}:\n{err}") from err
        return [results[slot] for slot in chosen]

    def abandon(self, slot: int) -> Call[W] | None:
        """Forgets the slot's running call (its caller gave up); the slot is replaced before its next call,
        so that one is not timed while queued behind stale work."""
        call = self.calls.pop(slot, None)
        if call is not None:
            self.dirty.add(slot)
        return call

    def replace_dirty(self) -> None:
        """Restarts (uncharged) the slots left running abandoned calls."""
        for slot in sorted(self.dirty):
            self.dirty.discard(slot)
            self._respawn(slot, "was left running an abandoned call")

    # ------------------------------------------------------------------------------------------ restarts

    def restart(self, slot: int, why: str, charge: bool = True) -> None:
        """Kills the slot's remote and starts another (in the background: see `wait`), charging the slot's
        budget; raises RuntimeError when it is spent."""
        self.calls.pop(slot, None)
        if charge:
            self.budget.charge(slot, why)
            self.events.count("restarts")
        n = self.budget.restarts[slot]
        log.warning("%s slot %d %s; restarting (restart %d)", self.policy.role, slot, why, n)
        self._respawn(slot, why)

    def _respawn(self, slot: int, why: str) -> None:
        self.transport.kill(self.handles[slot])
        self.handles[slot] = handle = self.transport.start(slot)
        pending = self.on_restart(slot, handle) if self.on_restart is not None else None
        future = pending if pending is not None else self.transport.ready(handle)
        self.starting[slot] = _Starting(future, self.clock() + self.policy.start_timeout_s, why)

    def settle(self, timeout_s: float | None = None) -> None:
        """Waits until no slot is restarting (each within start_timeout_s); raises when a budget is spent."""
        end = None if timeout_s is None else self.clock() + timeout_s
        while self.starting and (end is None or self.clock() < end):
            nearest = min(s.deadline for s in self.starting.values())
            wait_s = max(0.0, min(nearest, end if end is not None else nearest) - self.clock())
            done = set(self.transport.wait([s.future for s in self.starting.values()], wait_s))
            self._check_starting_done(done)
            self._expire_starting()

    def _check_starting_done(self, done: set[F]) -> None:
        for slot, start in list(self.starting.items()):
            if start.future not in done:
                continue
            del self.starting[slot]
            try:
                self.transport.get(start.future)
            except StartFailed as err:
                raise RuntimeError(f"{self.policy.role} slot {slot} cannot restart: {err}") from err
            except SlotDied as err:
                self.restart(slot, f"restart failed: died while starting: {err}")
            except Exception as err:  # noqa: BLE001 - its restart hook raised: it is not usable
                self.restart(slot, f"restart failed: {type(err).__name__}: {err}")

    def _expire_starting(self) -> None:
        now = self.clock()
        for slot, start in list(self.starting.items()):
            if start.deadline <= now and not self.transport.wait([start.future], 0.0):
                del self.starting[slot]
                self.events.count("timeouts")
                key = self.policy.key("start_timeout_s")
                self.restart(slot, f"restart failed: not up within {key}={self.policy.start_timeout_s:g} s")

    # ------------------------------------------------------------------------------------------ helpers

    def _finish(self, call: Call[W]) -> Outcome[W]:
        del self.calls[call.slot]
        seconds = self.clock() - call.submitted
        try:
            return Outcome(call, value=self.transport.get(call.future), seconds=seconds)
        except SlotDied as err:
            self.events.count("deaths")
            why = f"died: {err}"
            outcome: Outcome[W] = Outcome(call, failure=why, seconds=seconds)
            self.restart(call.slot, why)
            return outcome
        except Exception as err:  # noqa: BLE001 - the remote's own code raised: the caller decides
            return Outcome(call, error=err, seconds=seconds)

    def _await(self, futures: dict[int, F], timeout_s: float, key: str) -> dict[int, str]:
        """Waits for one future per slot; slot -> why for those that died, raised or did not answer."""
        by_future = {id(f): slot for slot, f in futures.items()}
        end, pending, failed = self.clock() + timeout_s, list(futures.values()), {}
        while pending:
            done = self.transport.wait(pending, max(0.0, end - self.clock()))
            if not done:
                break
            for future in done:
                pending = [f for f in pending if f is not future]
                try:
                    self.transport.get(future)
                except SlotDied as err:
                    failed[by_future[id(future)]] = f"died: {err}"
                except Exception as err:  # noqa: BLE001
                    failed[by_future[id(future)]] = f"{type(err).__name__}: {err}"
        for future in pending:
            failed[by_future[id(future)]] = f"did not answer within {key}={timeout_s:g} s"
            self.events.count("timeouts")
        return failed

    def take_events(self) -> dict[str, float]:
        """restarts / timeouts / deaths since the previous call, and their totals (`<event>_total`)."""
        out = {e: float(self.events.since[e]) for e in EVENTS}
        out.update({f"{e}_total": float(self.events.total[e]) for e in EVENTS})
        self.events.since.clear()
        return out


class RayTransport:
    """Ray actors of one class, each in its slot's placement (a restart lands where the slot was).

    Restarts are the supervisor's, never Ray's (`max_restarts=0`): a restarted remote must also get its
    state back (the latest weights) and its call resubmitted, which only the caller knows how to do."""

    def __init__(
        self,
        cls: type,
        args: tuple | Callable[[int], tuple] = (),
        options: dict[str, Any] | None = None,
        placement: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        """`args`: the constructor's arguments, or a function of the slot giving them (a rank's index)."""
        import ray

        self._cls = ray.remote(cls)
        self.args, self.options, self.placement = args, dict(options or {}), placement
        self.options["max_restarts"] = 0

    def start(self, slot: int) -> Any:
        options = dict(self.options)
        if self.placement is not None:
            options.update(self.placement(slot))
        args = self.args(slot) if callable(self.args) else self.args
        return self._cls.options(**options).remote(*args)

    def ready(self, handle: Any) -> F:
        return handle.ready.remote()

    def wait(self, futures: Sequence[F], timeout_s: float) -> list[F]:
        import ray

        if not futures:
            return []
        done, rest = ray.wait(list(futures), num_returns=1, timeout=timeout_s)
        if done and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        return done

    def get(self, future: F) -> Any:
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            return ray.get(future)
        except RayTaskError as err:  # the remote's own code raised: that exception, not a dead slot
            cause = err.cause if isinstance(err.cause, BaseException) else None
            raise (cause if cause is not None else err) from err
        except RayError as err:  # died: killed, crashed, out of memory, its node gone
            raise SlotDied(_short(err)) from err

    def kill(self, handle: Any) -> None:
        import ray

        ray.kill(handle, no_restart=True)


def _short(err: BaseException) -> str:
    """Ray's death errors run to many lines; their type and first line say what happened."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
