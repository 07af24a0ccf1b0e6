"""A user's rollout engine named by dotted path (defined in a test module, registered nowhere) is built by
each Ray rollout worker itself: the string travels, the worker imports the module and constructs it."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from cispo.core.types import PromptGroup, SamplingParams
from rollout.manager import LocalRolloutManager, RolloutManager
from tests.plugins.user_plugins import ECHO_MARK

ray = pytest.importorskip("ray")

USER_ENGINE = "tests.plugins.user_plugins:EchoEngine"
TAG = 42


def _groups() -> list[PromptGroup]:
    return [
        PromptGroup(index=i, prompt_ids=[10 + i, 20 + i], prompt_text=f"p{i}", reference=None, group_size=2)
        for i in range(4)
    ]


def test_local_manager_builds_the_user_engine_by_path():
    manager = LocalRolloutManager(USER_ENGINE, {"tag": TAG})
    samples = manager.generate(_groups(), SamplingParams(max_new_tokens=8))
    assert [s.response_ids for s in samples[::2]] == [
        [ECHO_MARK, TAG, os.getpid(), 10 + i, 20 + i] for i in range(4)
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_workers_build_the_user_engine_by_path():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray_user_engine_"))
    manager = None
    try:
        manager = RolloutManager(USER_ENGINE, {"tag": TAG}, num_workers=2, num_cpus_per_worker=1)
        worker_pids = set(ray.get([w.ready.remote() for w in manager.workers]))
        groups = _groups()
        samples = manager.generate(groups, SamplingParams(max_new_tokens=8))
        manager.update_weights({"w": torch.zeros(1)}, version=3)  # reaches the user's load_weights
        after = manager.generate(groups, SamplingParams(max_new_tokens=4))
    finally:
        if manager is not None:
            manager.shutdown()
        if started:
            ray.shutdown()
    assert [s.group_index for s in samples] == [g.index for g in groups for _ in range(2)]
    engine_pids = set()
    for s in samples:
        mark, tag, pid, *echo = s.response_ids
        assert (mark, tag, echo) == (ECHO_MARK, TAG, s.prompt_ids)
        assert s.behaviour_logprobs == [0.0] * len(s.response_ids) and s.policy_version == 0
        engine_pids.add(pid)
    # Built in the workers (one engine per worker, both used), not in this process.
    assert engine_pids == worker_pids and len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert {s.policy_version for s in after} == {3}
    assert all(len(s.response_ids) == 4 and s.finish_reason == "length" for s in after)
