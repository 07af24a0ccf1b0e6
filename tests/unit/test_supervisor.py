"""The supervisor on its own: a fake in-memory transport (futures completed by hand) and a fake clock that
moves only when the supervisor waits with nothing done, so every deadline and window below is exact."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cispo.core.supervisor import (
    Outcome,
    RayTransport,
    RestartBudget,
    SlotDied,
    SlotPolicy,
    StartFailed,
    Supervisor,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass(eq=False)
class Future:
    remote: Remote
    what: str
    done: bool = False
    value: Any = None
    error: BaseException | None = None

    def answer(self, value: Any = None) -> None:
        self.done, self.value = True, value

    def fail(self, error: BaseException) -> None:
        self.done, self.error = True, error


@dataclass(eq=False)
class Remote:
    slot: int
    serial: int  # the n-th remote started, over all slots
    alive: bool = True
    calls: list[Future] = field(default_factory=list)


class FakeTransport:
    """`hold`: serials whose readiness never answers; `die`/`broken`: serials whose readiness fails with
    SlotDied / StartFailed. A wait with nothing done moves the clock by its whole timeout."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.remotes: list[Remote] = []
        self.hold: set[int] = set()
        self.die: set[int] = set()
        self.broken: set[int] = set()

    def start(self, slot: int) -> Remote:
        self.remotes.append(remote := Remote(slot, len(self.remotes)))
        return remote

    def ready(self, remote: Remote) -> Future:
        future = Future(remote, "ready")
        if remote.serial in self.die:
            future.fail(SlotDied(f"remote {remote.serial} crashed"))
        elif remote.serial in self.broken:
            future.fail(StartFailed(f"remote {remote.serial} cannot import its plugin"))
        elif remote.serial not in self.hold:
            future.answer(remote.serial)
        return future

    def call(self, remote: Remote, work: Any) -> Future:
        remote.calls.append(future := Future(remote, str(work)))
        return future

    def wait(self, futures: list[Future], timeout_s: float) -> list[Future]:
        done = [f for f in futures if f.done]
        if not done:
            self.clock.t += timeout_s
        return done

    def get(self, future: Future) -> Any:
        if future.error is not None:
            raise future.error
        return future.value

    def kill(self, remote: Remote) -> None:
        remote.alive = False

    def live(self) -> list[int]:
        return [r.serial for r in self.remotes if r.alive]


def _started(slots: int = 2, **policy: Any) -> tuple[Supervisor, FakeTransport, Clock]:
    clock = Clock()
    transport = FakeTransport(clock)
    options = {"role": "reward actor", "start_timeout_s": 30.0, "keys": "reward", **policy}
    sup: Supervisor = Supervisor(transport, SlotPolicy(**options), slots, clock=clock)
    sup.start()
    return sup, transport, clock


def _call(sup: Supervisor, slot: int, work: str, timeout_s: float = 10.0) -> Future:
    return sup.submit(slot, work, sup.transport.call, timeout_s).future


def test_start_names_the_slot_that_never_answers_and_kills_every_remote() -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    transport.hold = {1}
    policy = SlotPolicy("rollout worker", start_timeout_s=30.0, keys="rollout")
    sup: Supervisor = Supervisor(transport, policy, 3, clock=clock)
    expected = r"^rollout worker slot 1 failed to start: did not answer within rollout.start_timeout_s=30 s$"
    with pytest.raises(RuntimeError, match=expected):
        sup.start()
    assert clock.t == 30.0, "it waited the whole start_timeout_s, no more"
    assert transport.live() == [] and sup.handles == []
    assert sup.take_events()["timeouts"] == 1.0


def test_start_names_a_slot_that_died_while_starting() -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    transport.die = {2}
    sup: Supervisor = Supervisor(transport, SlotPolicy("learner rank", 5.0), 3, clock=clock)
    with pytest.raises(RuntimeError, match=r"^learner rank slot 2 failed to start: died: remote 2 crashed$"):
        sup.start()
    assert clock.t == 0.0 and transport.live() == []


def test_a_frozen_slot_times_out_is_replaced_and_its_work_comes_back() -> None:
    sup, transport, clock = _started(2)
    frozen, fine = _call(sup, 0, "a", timeout_s=10.0), _call(sup, 1, "b", timeout_s=20.0)
    outcomes = sup.wait(100.0)  # nothing done: it waits up to the nearest deadline (10 s), not 100 s
    assert clock.t == 10.0 and len(outcomes) == 1
    out = outcomes[0]
    assert (out.call.work, out.timed_out, out.ok, out.error) == ("a", True, False, None)
    assert out.failure == "did not answer within 10 s" and out.seconds == 10.0
    assert not frozen.remote.alive and transport.live() == [1, 2], "slot 0's remote killed, a new one started"
    assert sup.idle_slots() == [], "slot 0 is starting, slot 1 busy"
    fine.answer("B")
    [done] = sup.wait(100.0)
    assert (done.value, done.ok, done.seconds, clock.t) == ("B", True, 10.0, 10.0)
    assert sup.idle_slots() == [0, 1], "the replacement answered ready"
    again = _call(sup, 0, out.call.work)  # the caller resubmits the work handed back
    assert again.remote.serial == 2 and [f.what for f in again.remote.calls] == ["a"]
    assert sup.take_events() == {
        "restarts": 1.0,
        "timeouts": 1.0,
        "deaths": 0.0,
        "restarts_total": 1.0,
        "timeouts_total": 1.0,
        "deaths_total": 0.0,
    }


def test_a_dead_slot_fails_its_call_and_is_restarted() -> None:
    sup, transport, clock = _started(2)
    future = _call(sup, 1, "w")
    future.fail(SlotDied("ActorDiedError: killed"))
    [out] = sup.wait(5.0)
    assert out.failure == "died: ActorDiedError: killed" and not out.timed_out and out.call.work == "w"
    assert transport.live() == [0, 2] and transport.remotes[2].slot == 1
    events = sup.take_events()
    assert (events["deaths"], events["restarts"], events["timeouts"]) == (1.0, 1.0, 0.0)
    assert clock.t == 0.0


def test_the_remotes_own_exception_comes_back_without_a_restart() -> None:
    sup, transport, _ = _started(1)
    error = ValueError("plugin broke")
    _call(sup, 0, "w").fail(error)
    [out] = sup.wait(5.0)
    assert out.error is error and out.failure == "" and not out.ok and not out.timed_out
    assert transport.live() == [0] and sup.idle_slots() == [0]
    assert sup.take_events()["restarts"] == 0.0


def test_the_budget_slides_over_its_window() -> None:
    clock = Clock()
    budget = RestartBudget(SlotPolicy("w", 1.0, max_restarts=2, restart_window_s=100.0, keys="k"), 2, clock)
    budget.charge(0, "died")  # t=0
    clock.t = 10.0
    budget.charge(0, "died")  # t=10: 2 in the window
    budget.charge(1, "died")  # another slot has its own budget
    clock.t = 50.0
    with pytest.raises(RuntimeError, match=r"w slot 0 died, and its restart budget is spent: 2 restart"):
        budget.charge(0, "died")
    clock.t = 100.0  # t=0 leaves the window (100 - 100 >= 0)
    budget.charge(0, "died")  # the window now holds t=10 and t=100
    clock.t = 105.0
    with pytest.raises(RuntimeError, match=r"k.max_restarts=2 per k.restart_window_s=100"):
        budget.charge(0, "died")
    assert budget.restarts == [3, 1], "refused restarts are not counted"


def test_window_zero_is_per_run_and_none_is_unlimited() -> None:
    clock = Clock()
    per_run = RestartBudget(SlotPolicy("w", 1.0, max_restarts=1, restart_window_s=0.0), 1, clock)
    per_run.charge(0, "died")
    clock.t = 1e9
    with pytest.raises(RuntimeError, match=r"1 restart\(s\) in this run"):
        per_run.charge(0, "died")
    unlimited = RestartBudget(SlotPolicy("w", 1.0, max_restarts=None), 1, clock)
    for _ in range(50):
        unlimited.charge(0, "timed out")
    assert unlimited.restarts == [50]


def test_a_spent_budget_stops_the_run_naming_the_slot_and_key() -> None:
    sup, transport, clock = _started(2, max_restarts=1, restart_window_s=60.0)
    _call(sup, 1, "w").fail(SlotDied("first"))
    sup.wait(1.0)
    sup.settle()
    clock.t = 59.0
    _call(sup, 1, "w").fail(SlotDied("second"))
    spent = (
        r"reward actor slot 1 died: second, and its restart budget is spent: 1 restart\(s\) in the last 60 s "
        r"\(reward.max_restarts=1 per reward.restart_window_s=60"
    )
    with pytest.raises(RuntimeError, match=spent):
        sup.wait(1.0)


def test_failed_restarts_count_against_the_budget() -> None:
    sup, transport, clock = _started(1, max_restarts=3)
    transport.die = {1, 2}  # the next two replacements die while starting
    transport.hold = {3}  # the third never answers
    _call(sup, 0, "w").fail(SlotDied("crash"))
    for restarts in (1, 2, 3):  # each wait sees the previous replacement die while starting
        sup.wait(1.0)
        assert sup.budget.restarts == [restarts] and transport.live() == [restarts]
    assert clock.t == 0.0
    with pytest.raises(
        RuntimeError, match=r"restart failed: not up within reward.start_timeout_s=30 s, and its"
    ):
        sup.settle()
    assert clock.t == 30.0
    assert sup.take_events()["timeouts"] == 1.0


def test_a_remote_that_cannot_load_is_not_restarted_even_with_an_unlimited_budget() -> None:
    sup, transport, _ = _started(1, max_restarts=None)
    transport.broken = {1}
    _call(sup, 0, "w").fail(SlotDied("crash"))
    sup.wait(1.0)  # restart 1: remote 1 starts
    with pytest.raises(RuntimeError, match=r"slot 0 cannot restart: remote 1 cannot import its plugin"):
        sup.wait(1.0)
    assert len(transport.remotes) == 2, "no retry after a load failure"


def test_call_all_names_the_slot_that_died_raised_or_did_not_answer() -> None:
    sup, transport, clock = _started(3)
    calls: list[Future] = []

    def each(remote: Remote) -> Future:
        calls.append(future := transport.call(remote, "sync"))
        return future

    def run(finish: dict[int, Any], timeout_s: float | None = 10.0) -> list[Any]:
        calls.clear()
        original = transport.wait

        def answer_then_wait(futures: list[Future], t: float) -> list[Future]:
            for slot, how in finish.items():
                if not calls[slot].done:
                    calls[slot].fail(how) if isinstance(how, BaseException) else calls[slot].answer(how)
            return original(futures, t)

        transport.wait = answer_then_wait  # type: ignore[method-assign]
        try:
            return sup.call_all(each, timeout_s, "load weights")
        finally:
            transport.wait = original  # type: ignore[method-assign]

    assert run({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"], "by slot, whatever the order of answers"
    with pytest.raises(RuntimeError, match=r"^reward actor 1 died during load weights: gone$"):
        run({0: "a", 1: SlotDied("gone"), 2: "c"})
    with pytest.raises(RuntimeError, match=r"^reward actor 2 failed in load weights:\nbad shape$"):
        run({0: "a", 1: "b", 2: ValueError("bad shape")})
    start = clock.t
    with pytest.raises(RuntimeError, match=r"slot\(s\) \[0, 2\]: no answer to load weights within 10 s"):
        run({1: "b"})
    assert clock.t == start + 10.0


def test_abandoned_slots_are_replaced_without_charge_and_settle_waits_for_restarts() -> None:
    sup, transport, clock = _started(2, max_restarts=0)
    _call(sup, 0, "stale")
    assert sup.abandon(0).work == "stale" and sup.idle_slots() == [1]
    sup.replace_dirty()
    assert transport.live() == [1, 2] and sup.budget.restarts == [0, 0], "uncharged: max_restarts=0 holds"
    _call(sup, 1, "w").fail(SlotDied("x"))
    with pytest.raises(RuntimeError, match="budget is spent"):  # max_restarts=0: the first death stops
        sup.wait(1.0)


def test_settle_is_bounded_by_its_own_timeout() -> None:
    sup, transport, clock = _started(1, max_restarts=5)
    transport.hold = {1}
    sup.restart(0, "test")
    sup.settle(timeout_s=2.0)
    assert clock.t == 2.0 and 0 in sup.starting, "waited its 2 s, not the 30 s start_timeout_s"


def test_counters_since_the_last_take_and_over_the_life() -> None:
    sup, _, _ = _started(1, max_restarts=None)
    for _ in range(2):
        _call(sup, 0, "w", timeout_s=1.0)
        sup.wait(5.0)
        sup.settle()
    first = sup.take_events()
    assert (first["timeouts"], first["restarts"], first["timeouts_total"]) == (2.0, 2.0, 2.0)
    _call(sup, 0, "w").fail(SlotDied("x"))
    outcomes: list[Outcome] = sup.wait(1.0)
    second = sup.take_events()
    assert outcomes[0].failure == "died: x"
    assert (second["timeouts"], second["deaths"], second["restarts"]) == (0.0, 1.0, 1.0)
    assert (second["timeouts_total"], second["deaths_total"], second["restarts_total"]) == (2.0, 1.0, 3.0)


# ---------------------------------------------------------------------------------------------- real Ray


class Echo:
    """A trivial actor: `run` logs its start and end (O_APPEND lines) around a sleep."""

    def ready(self) -> int:
        return os.getpid()

    def run(self, work: str, log: str, sleep_s: float) -> tuple[str, int]:
        with open(log, "a") as f:
            f.write(f"start {work}\n")
        time.sleep(sleep_s)
        with open(log, "a") as f:
            f.write(f"done {work}\n")
        return work, os.getpid()


def _ready(actor: Any) -> Any:
    return actor.ready.remote()


def _collect(sup: Supervisor, n: int, within_s: float = 180.0) -> list[Outcome]:
    out: list[Outcome] = []
    end = time.monotonic() + within_s  # a hang guard only
    while len(out) < n:
        assert time.monotonic() < end, f"only {len(out)} of {n} calls ended"
        out += sup.wait(1.0)
    return out


@pytest.fixture
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        temp = tempfile.mkdtemp(prefix="ray_sup_", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp)
    yield ray
    if started:
        ray.shutdown()


def test_ray_a_frozen_and_a_killed_actor_are_replaced_and_their_work_answered_once(
    ray_session: Any, tmp_path: Path
) -> None:
    ray, log = ray_session, tmp_path / "log"
    sup: Supervisor = Supervisor(
        RayTransport(Echo, options={"num_cpus": 0.5}), SlotPolicy("echo actor", 120.0, max_restarts=2), 2
    )
    sup.start()
    first = sup.call_all(_ready, 60.0, "ready")
    os.kill(first[0], signal.SIGSTOP)  # slot 0 frozen before its call: it never starts it
    try:

        def run(actor: Any, work: tuple[str, float]) -> Any:
            return actor.run.remote(work[0], str(log), work[1])

        sup.submit(0, ("a", 0.0), run, 3.0)
        sup.submit(1, ("b", 600.0), run, 300.0)
        end = time.monotonic() + 120
        while "start b" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < end, "slot 1 never started its call"
            time.sleep(0.05)
        ray.kill(sup.handles[1], no_restart=True)
        failed = {o.call.work[0]: o for o in _collect(sup, 2)}
        assert failed["a"].timed_out and failed["a"].failure == "did not answer within 3 s"
        assert not failed["b"].timed_out and failed["b"].failure.startswith("died: ")
        sup.settle()
        again = sup.call_all(_ready, 60.0, "ready")
        assert not set(again) & set(first), "both slots hold new actors"
        for slot, o in zip(sup.idle_slots(), failed.values()):  # the test resubmits the work handed back
            sup.submit(slot, (o.call.work[0], 0.0), run, 60.0)
        answers = sorted(o.value for o in _collect(sup, 2))
        assert [w for w, _ in answers] == ["a", "b"] and {pid for _, pid in answers} <= set(again)
        lines = log.read_text().splitlines()
        assert sorted(lines) == ["done a", "done b", "start a", "start b", "start b"], "each answered once"
        events = sup.take_events()
        assert (events["timeouts"], events["deaths"], events["restarts"]) == (1.0, 1.0, 2.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first[0], signal.SIGCONT)  # Ray has killed it; if not, let it run so Ray can
        sup.shutdown()
