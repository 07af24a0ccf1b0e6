"""RolloutManager on Ray: sharding and order, weight sync and versions, worker death, the broadcast path."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from cispo.core.types import PromptGroup, SamplingParams
from rollout.manager import RolloutManager
from rollout.weight_sync import NcclWeightSync
from tests.rollout.conftest import greedy_full_forward, make_dense

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manager(ray_cluster, dense_model):
    manager = RolloutManager(
        "hf", {"model": dense_model, "max_batch_size": 16}, num_workers=2, num_cpus_per_worker=1
    )
    yield manager
    manager.shutdown()


def _groups(n: int, group_size: int, start: int = 0) -> list[PromptGroup]:
    return [
        PromptGroup(index=start + i, prompt_ids=[1 + i % 5] * (2 + i % 3), prompt_text=f"p{i}", reference=i,
                    metadata={"row": i}, group_size=group_size)
        for i in range(n)
    ]  # fmt: skip


def _assert_complete(samples, groups) -> None:
    expected = [g.index for g in groups for _ in range(g.group_size)]
    assert [s.group_index for s in samples] == expected  # none lost, none duplicated, input order
    by_index = {g.index: g for g in groups}
    for s in samples:
        assert s.prompt_ids == by_index[s.group_index].prompt_ids
        assert s.reference == by_index[s.group_index].reference
        assert len(s.response_ids) == len(s.behaviour_logprobs) > 0


def test_groups_are_sharded_and_gathered_in_order(manager):
    groups = _groups(7, group_size=3)
    samples = manager.generate(groups, SamplingParams(max_new_tokens=8))
    _assert_complete(samples, groups)
    assert manager.last_timings["new_tokens"] == 7 * 3 * 8


def test_weight_update_reaches_every_worker(manager):
    learner = make_dense(seed=4)
    latency = manager.update_weights(learner.state_dict(), version=5)
    assert 0 < latency < 30
    groups = [PromptGroup(index=i, prompt_ids=[5, 6, 7], prompt_text="", reference=None, group_size=2)
              for i in range(4)]  # fmt: skip
    samples = manager.generate(groups, SamplingParams(max_new_tokens=10, temperature=1e-6))
    assert {s.policy_version for s in samples} == {5}
    assert {tuple(s.response_ids) for s in samples} == {tuple(greedy_full_forward(learner, [5, 6, 7], 10))}


def _wait_for(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_killing_a_worker_mid_batch_loses_and_duplicates_nothing(ray_cluster, dense_model, tmp_path):
    # The engine signals that decoding started and holds there, so the kill lands mid-batch on any machine.
    engine = "tests.rollout.gated_engine:GatedHFEngine"
    manager = RolloutManager(
        engine, {"model": dense_model, "max_batch_size": 16, "gate_dir": str(tmp_path)}, num_workers=2
    )
    try:
        manager.update_weights(make_dense(seed=6).state_dict(), version=9)
        groups = _groups(8, group_size=4, start=100)
        result: dict = {}
        (tmp_path / "hold").touch()
        thread = threading.Thread(
            target=lambda: result.update(samples=manager.generate(groups, SamplingParams(max_new_tokens=16)))
        )
        victim = manager.workers[0]
        victim_pid = ray.get(victim.ready.remote())
        thread.start()
        _wait_for(tmp_path / f"started-{victim_pid}")
        ray.kill(victim, no_restart=True)
        (tmp_path / "hold").unlink()
        thread.join(timeout=300)
        assert not thread.is_alive()
        samples = result["samples"]
        _assert_complete(samples, groups)
        assert Counter(s.group_index for s in samples) == {g.index: 4 for g in groups}
        assert manager.last_timings["restarts"] == 1 and manager.workers[0] is not victim
        assert {s.policy_version for s in samples} == {9}  # the restarted worker got the latest weights back
    finally:
        manager.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broadcast_weight_sync_over_gloo(manager):
    """The NCCL protocol (metadata over Ray, bucketed broadcast from learner rank 0) run on gloo/CPU."""
    sync = NcclWeightSync(manager.workers, "127.0.0.1", _free_port(), backend="gloo", device="cpu")
    learner = make_dense(seed=8)
    latency = sync.push(learner.state_dict(), version=12)
    assert 0 < latency < 30
    assert ray.get([w.version.remote() for w in manager.workers]) == [12, 12]
    groups = [PromptGroup(index=0, prompt_ids=[3, 4], prompt_text="", reference=None, group_size=2)]
    samples = manager.generate(groups, SamplingParams(max_new_tokens=10, temperature=1e-6))
    assert [s.response_ids for s in samples] == [greedy_full_forward(learner, [3, 4], 10)] * 2


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU)"
)
def test_broadcast_weight_sync_over_nccl(ray_cluster, dense_model):
    manager = RolloutManager(
        "hf", {"model": dense_model, "device": "cuda"}, num_workers=1, num_gpus_per_worker=0.5
    )
    try:
        # Ray hands the worker the first free GPU; the learner (this process) takes the last one.
        learner_device = f"cuda:{torch.cuda.device_count() - 1}"
        torch.cuda.set_device(learner_device)
        sync = NcclWeightSync(
            manager.workers, "127.0.0.1", _free_port(), backend="nccl", device=learner_device
        )
        learner = make_dense(seed=8)
        assert sync.push(learner.state_dict(), version=3) > 0
        groups = [PromptGroup(index=0, prompt_ids=[3, 4], prompt_text="", reference=None)]
        samples = manager.generate(groups, SamplingParams(max_new_tokens=10, temperature=1e-6))
        assert samples[0].response_ids == greedy_full_forward(learner, [3, 4], 10)
        assert samples[0].policy_version == 3
    finally:
        manager.shutdown()
