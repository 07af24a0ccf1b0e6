"""The generation stream over Ray workers that fail mid-job: one frozen (SIGSTOP, found by its deadline),
one killed (found dead). Every job comes back exactly once, the lost ones resubmitted to whichever slot is
free, and each samples what it did in an undisturbed run (its groups' own seeds), on the published weights
the restarted workers load before their next task.

The gated engine holds both workers inside generate() while the faults are injected, so nothing depends on
machine speed except that a healthy tiny-model call answers within TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Hashable

import pytest

from cispo.core.types import PromptGroup, SamplingParams
from rollout.manager import RolloutManager
from rollout.stream import FinishedGroup, GenerationStream, GroupJob
from rollout.tasks import per_group
from tests.rollout.conftest import make_dense
from tests.rollout.test_ray_manager import _groups, _wait_for
from tests.rollout.test_worker_timeouts import GATED, TIMEOUT_S, _release, _wait_until_gone

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

JOBS = 12
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2024)


def _jobs(run: str, version: int) -> list[GroupJob]:
    """12 jobs of 1 or 2 groups (18 groups), each seeded by its first group, as the rollout stage does."""
    groups, jobs, at = _groups(18, group_size=2, start=500), [], 0
    for j in range(JOBS):
        part: list[PromptGroup] = groups[at : at + 1 + j % 2]
        at += len(part)
        jobs.append(GroupJob((run, j), part, per_group(PARAMS, part[0].index), version))
    return jobs


class Finished:
    """on_finished, counting every job by key."""

    def __init__(self) -> None:
        self.count: Counter[Hashable] = Counter()
        self.jobs: dict[Hashable, FinishedGroup] = {}
        self.cond = threading.Condition()

    def __call__(self, done: FinishedGroup) -> None:
        with self.cond:
            self.count[done.key] += 1
            self.jobs[done.key] = done
            self.cond.notify_all()

    def wait_all(self, keys: list[Hashable], stream: GenerationStream, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s  # a hang guard only
        with self.cond:
            while not all(k in self.jobs for k in keys):
                missing = [k for k in keys if k not in self.jobs]
                assert time.monotonic() < deadline, f"jobs never came back: {missing}"
                self.cond.wait(timeout=0.5)
                stream.depth()  # raises when the stream stopped


def _answers(done: FinishedGroup) -> list[tuple[int, list[int]]]:
    return [(s.group_index, s.response_ids) for s in done.samples]


def _logprobs(done: FinishedGroup) -> list[float]:
    return [lp for s in done.samples for lp in s.behaviour_logprobs]


def test_a_frozen_and_a_killed_worker_lose_and_duplicate_no_job(ray_cluster, dense_model, tmp_path):
    manager = RolloutManager(
        GATED,
        {"model": dense_model, "max_batch_size": 16, "gate_dir": str(tmp_path)},
        num_workers=2,
        worker_timeout_s=TIMEOUT_S,
    )
    finished = Finished()
    stream = GenerationStream(manager, finished)
    frozen_pid = None
    try:
        stream.publish(make_dense(seed=6).state_dict(), 1)
        reference = _jobs("undisturbed", 1)
        stream.add(reference)
        finished.wait_all([j.key for j in reference], stream)
        assert stream.call(manager.take_events)["restarts_total"] == 0
        for started in tmp_path.glob("started-*"):
            started.unlink()

        frozen_pid, killed_pid = ray.get([w.ready.remote() for w in manager.workers])
        victims = list(manager.workers)
        for pid in (frozen_pid, killed_pid):  # both hold inside generate() once they get a job
            (tmp_path / f"hold-{pid}").touch()
        jobs = _jobs("disturbed", 1)
        stream.add(jobs)
        for pid in (frozen_pid, killed_pid):
            _wait_for(tmp_path / f"started-{pid}")
        held = {job.key for job in stream._running.values()}  # both slots are stopped inside their job
        assert len(held) == 2
        os.kill(frozen_pid, signal.SIGSTOP)  # slot 0: alive, silent: found by its deadline
        ray.kill(victims[1], no_restart=True)  # slot 1: dead, found at once
        finished.wait_all([j.key for j in jobs], stream)

        keys = [j.key for j in jobs]
        assert {k: finished.count[k] for k in keys} == dict.fromkeys(keys, 1)  # none lost, none twice
        assert sum(finished.count.values()) == 2 * JOBS
        for job in reference:
            again = finished.jobs[("disturbed", job.key[1])]
            assert _answers(again) == _answers(finished.jobs[job.key]), f"job {job.key[1]}"
            assert _logprobs(again) == pytest.approx(_logprobs(finished.jobs[job.key]), abs=1e-5)
            assert [g.index for g in again.groups] == [g.index for g in job.groups]
            assert {s.policy_version for s in again.samples} == {1}  # restarted workers loaded v1 first
        assert all(finished.count[k] == 1 for k in held)  # the two lost jobs, back once each
        events = stream.call(manager.take_events)
        assert (events["timeouts"], events["deaths"], events["restarts"]) == (1, 1, 2)
        assert manager.restarts == [1, 1]
        assert all(w is not v for w, v in zip(manager.workers, victims))
        assert stream.stats.take()["rollout/tasks_lost"] == 2
        _wait_until_gone(frozen_pid)  # Ray SIGKILLs the stopped process
    finally:
        _release(frozen_pid)
        stream.close()
        manager.shutdown()
