"""The default stall limit of a rollout worker follows the budget and the measured decode speed
(rollout.stall): a worker frozen mid-shard is replaced after a few times what its shard should take, not
after a fixed 1,800 s, and the replacement's shard is resampled identically."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cispo.core.types import SamplingParams
from rollout.manager import RolloutManager
from tests.rollout.test_ray_manager import _assert_complete, _groups
from tests.rollout.test_worker_timeouts import (
    GATED,
    _freeze_inside,
    _in_thread,
    _join,
    _release,
    _wait_until_gone,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

START_S = 600.0  # the limit before anything is measured: far above what the derived one comes to


def test_a_frozen_worker_is_replaced_after_the_derived_limit(ray_cluster, dense_model, tmp_path: Path):
    kwargs = {"model": dense_model, "max_batch_size": 16, "gate_dir": str(tmp_path)}
    manager = RolloutManager(
        GATED, kwargs, num_workers=2, start_timeout_s=START_S, timeout_factor=4.0, timeout_floor_s=5.0
    )
    victim_pid = None
    try:
        groups = _groups(8, group_size=4, start=100)
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=99)
        undisturbed = manager.generate(groups, params)  # measures the decode speed
        assert manager.stall.rate is not None and manager.stall.rate > 0
        limit, how = manager.stall.for_shard(16, 12)
        assert limit < START_S and "tokens/s" in how
        victim_pid = ray.get(manager.workers[0].ready.remote())
        (tmp_path / f"started-{victim_pid}").unlink()
        (tmp_path / f"hold-{victim_pid}").touch()
        thread, out = _in_thread(lambda: manager.generate(groups, params))
        _freeze_inside(tmp_path, "started", victim_pid)
        samples = _join(thread, out)  # with the old fixed 1,800 s this would hang past the join's guard
        _assert_complete(samples, groups)
        assert Counter(s.group_index for s in samples) == {g.index: 4 for g in groups}
        assert (manager.last_timings["timeouts"], manager.last_timings["restarts"]) == (1, 1)
        assert [s.response_ids for s in samples] == [s.response_ids for s in undisturbed]
        _wait_until_gone(victim_pid)
    finally:
        _release(victim_pid)
        manager.shutdown()
