"""Rollout workers that freeze: killed after worker_timeout_s and restarted, the task they held resubmitted to
whichever slot is free (the same tokens: each group samples with its own seed, whatever slot runs it), the
latest weights loaded by the restarted worker before its next task; the per-slot, per-window restart budget.

The frozen worker is SIGSTOPped while provably inside generate() or a weight load (the gated engine holds
it there), so nothing depends on machine speed except that a healthy tiny-model call answers within
TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cispo.core.types import SamplingParams
from rollout.manager import RolloutManager
from tests.rollout.conftest import greedy_full_forward, make_dense
from tests.rollout.test_ray_manager import _assert_complete, _groups, _wait_for

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

GATED = "tests.rollout.gated_engine:GatedHFEngine"
TIMEOUT_S = 10.0  # a healthy call here (a tiny model, a few tokens) answers in well under a second


def _gated_manager(dense_model, gate: Path) -> RolloutManager:
    kwargs = {"model": dense_model, "max_batch_size": 16, "gate_dir": str(gate)}
    return RolloutManager(GATED, kwargs, num_workers=2, worker_timeout_s=TIMEOUT_S)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # re-raised by _join in the test's thread
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _join(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(timeout=300)
    assert not thread.is_alive(), "the manager hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def _release(pid: int | None) -> None:
    """Let a test's stopped process run again (Ray then kills it normally) whatever the test's outcome."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _wait_until_gone(pid: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid):
        assert time.monotonic() < deadline, f"the frozen worker {pid} was never killed"
        time.sleep(0.05)


def _freeze_inside(gate: Path, arrived: str, pid: int) -> None:
    _wait_for(gate / f"{arrived}-{pid}")
    os.kill(pid, signal.SIGSTOP)


def test_a_frozen_worker_mid_batch_is_replaced_and_its_shard_resampled_identically(
    ray_cluster, dense_model, tmp_path
):
    manager = _gated_manager(dense_model, tmp_path)
    victim_pid = None
    try:
        manager.update_weights(make_dense(seed=6).state_dict(), version=9)
        groups = _groups(8, group_size=4, start=100)
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234)
        undisturbed = manager.generate(groups, params)
        assert manager.last_timings["timeouts"] == manager.last_timings["restarts"] == 0
        victim = manager.workers[0]
        victim_pid = ray.get(victim.ready.remote())
        (tmp_path / f"started-{victim_pid}").unlink()
        (tmp_path / f"hold-{victim_pid}").touch()  # only the victim holds: the other shard runs freely
        thread, out = _in_thread(lambda: manager.generate(groups, params))
        _freeze_inside(tmp_path, "started", victim_pid)
        samples = _join(thread, out)
        _assert_complete(samples, groups)
        assert Counter(s.group_index for s in samples) == {g.index: 4 for g in groups}
        timings = manager.last_timings
        assert (timings["timeouts"], timings["restarts"]) == (1, 1)
        assert (timings["timeouts_total"], timings["restarts_total"]) == (1, 1)
        assert manager.workers[0] is not victim and manager.restarts == [1, 0]
        assert {s.policy_version for s in samples} == {9}  # the restarted worker got the latest weights back
        # Each group's own seed (rollout.tasks.group_seed): whichever slot ran the lost task again sampled
        # exactly what the frozen worker would have.
        assert [s.response_ids for s in samples] == [s.response_ids for s in undisturbed]
        logprobs = [lp for s in samples for lp in s.behaviour_logprobs]
        assert logprobs == pytest.approx([lp for s in undisturbed for lp in s.behaviour_logprobs], abs=1e-5)
        _wait_until_gone(victim_pid)  # Ray SIGKILLs the stopped process: nothing frozen holds memory on
    finally:
        _release(victim_pid)
        manager.shutdown()


def test_a_worker_frozen_during_weight_sync_is_restarted_with_the_new_weights(
    ray_cluster, dense_model, tmp_path
):
    manager = _gated_manager(dense_model, tmp_path)
    victim_pid = None
    try:
        victim_pid = ray.get(manager.workers[1].ready.remote())
        (tmp_path / f"hold-{victim_pid}").touch()
        learner = make_dense(seed=11)
        thread, out = _in_thread(lambda: manager.update_weights(learner.state_dict(), version=4))
        _freeze_inside(tmp_path, "loading", victim_pid)
        assert _join(thread, out) >= TIMEOUT_S
        # The sync reports its own events (once: the next generate() starts counting afresh).
        assert (manager.last_timings["timeouts"], manager.last_timings["restarts"]) == (1, 1)
        assert manager.restarts == [0, 1] and manager.version == 4
        # The fresh worker holds the initial weights; version 4 stays published for its next task.
        manager.sup.settle()
        assert manager.slot_version == [4, 0] and ray.get(manager.workers[1].version.remote()) == 0
        groups = _groups(4, group_size=2)
        # Every slot is idle, so each one takes a task at once: the restarted one loads version 4 first.
        samples = manager.generate(groups, SamplingParams(max_new_tokens=10, temperature=1e-6))
        assert ray.get([w.version.remote() for w in manager.workers]) == [4, 4]
        assert {s.policy_version for s in samples} == {4}
        for s in samples:
            assert s.response_ids == greedy_full_forward(learner, s.prompt_ids, 10)
        assert (manager.last_timings["timeouts"], manager.last_timings["restarts"]) == (0, 0)
        assert (manager.last_timings["timeouts_total"], manager.last_timings["restarts_total"]) == (1, 1)
        _wait_until_gone(victim_pid)
    finally:
        _release(victim_pid)
        manager.shutdown()


def test_the_restart_budget_is_per_slot_refills_after_its_window_and_then_stops_the_run(
    ray_cluster, dense_model
):
    kwargs = {"model": dense_model, "max_batch_size": 16}
    manager = RolloutManager("hf", kwargs, num_workers=2, max_restarts=1, restart_window_s=100)
    now = [0.0]
    manager.sup.budget.clock = lambda: now[0]  # the window's clock, so the test needs no waiting
    groups = _groups(4, group_size=2)

    def kill_and_generate(slot: int) -> None:
        # Every slot up first: generate() then hands each idle slot a task at once, so the dead one is
        # found by its own task (lost, and run again on whichever slot is free), not by chance.
        manager.sup.settle()
        assert manager.idle_slots() == [0, 1]
        ray.kill(manager.workers[slot], no_restart=True)
        _assert_complete(manager.generate(groups, SamplingParams(max_new_tokens=4)), groups)

    try:
        kill_and_generate(0)
        kill_and_generate(1)  # the budget is per slot: slot 0's restart does not spend slot 1's
        assert manager.restarts == [1, 1] and manager.last_timings["restarts_total"] == 2
        now[0] = 100.0  # slot 0's restart at t=0 leaves the window
        kill_and_generate(0)
        assert manager.restarts == [2, 1] and manager.last_timings["restarts"] == 1
        with pytest.raises(RuntimeError) as err:
            kill_and_generate(0)
        message = str(err.value)
        assert "rollout worker slot 0 died" in message and "restart budget is spent" in message
        assert "rollout.max_restarts=1 per rollout.restart_window_s=100" in message
    finally:
        manager.shutdown()
