"""Weights straight from learner rank 0 to the engines (BroadcastWeightSync over gloo), with a real
DeepSpeed learner rank and real rollout workers, including a worker that dies between syncs.

Each check compares what the workers sample and score against an in-process engine loaded with the
learner's weights: same tokens and the same behaviour log-probs (to 1e-6) mean the same weights."""

import copy

import pytest
import ray
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.types import PromptGroup, SamplingParams
from cispo.learner import build_learner
from rollout.manager import LocalRolloutManager, RolloutManager
from rollout.weight_sync import BroadcastWeightSync
from tests.learner.helpers import make_batch, tiny_dense, tiny_minimax

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_new_tokens=6, temperature=1e-6)


def groups() -> list[PromptGroup]:
    # Equal-length prompts: no padding, so batched and single decoding agree exactly.
    return [
        PromptGroup(index=i, prompt_ids=[5 + i, 7, 9], prompt_text="", reference=None, group_size=2)
        for i in range(4)
    ]


def reference_samples(model, weights: dict[str, torch.Tensor]):
    local = LocalRolloutManager("hf", {"model": copy.deepcopy(model), "max_batch_size": 16})
    local.update_weights(weights, 1)
    return local.generate(groups(), GREEDY)


def assert_same(samples, expected, version: int) -> None:
    assert [s.response_ids for s in samples] == [s.response_ids for s in expected]
    for got, want in zip(samples, expected):
        torch.testing.assert_close(
            torch.tensor(got.behaviour_logprobs), torch.tensor(want.behaviour_logprobs), atol=1e-6, rtol=0
        )
    assert {s.policy_version for s in samples} == {version}


@pytest.fixture(scope="module")
def setup():
    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=4, include_dashboard=False)
    model = tiny_dense(seed=3, vocab=100)
    tok = tiny_minimax()[1]
    cfg = LearnerConfig(lr=5e-2, warmup_steps=0, num_threads=1, zero_stage=2, num_ranks=1)
    learner = build_learner("deepspeed", model=copy.deepcopy(model), cfg=cfg, algorithm=AlgorithmConfig())
    manager = RolloutManager(
        "hf",
        {"model": tiny_dense(seed=9, vocab=100), "max_batch_size": 16},  # other weights until the first sync
        num_workers=2,
        num_threads_per_worker=1,
        weight_sync=BroadcastWeightSync(learner, bucket_bytes=4096),  # many buckets for a tiny model
    )
    yield {"model": model, "tok": tok, "learner": learner, "manager": manager}
    manager.shutdown()
    learner.close()
    if owned:
        ray.shutdown()


def test_broadcast_puts_the_learners_weights_on_every_worker(setup):
    learner, manager = setup["learner"], setup["manager"]
    assert manager.broadcasts
    manager.broadcast_weights(1)
    assert_same(
        manager.generate(groups(), GREEDY),
        reference_samples(setup["model"], learner.state_dict_for_sync()),
        1,
    )
    learner.train_step(make_batch(setup["tok"], 8))  # lr 5e-2: the weights really move
    manager.broadcast_weights(2)
    after = learner.state_dict_for_sync()
    assert_same(manager.generate(groups(), GREEDY), reference_samples(setup["model"], after), 2)


def test_a_worker_that_dies_comes_back_with_the_learners_weights(setup):
    learner, manager = setup["learner"], setup["manager"]
    current = learner.state_dict_for_sync()
    victim = manager.workers[0]
    ray.kill(victim, no_restart=True)
    samples = manager.generate(groups(), GREEDY)  # slot 0 restarts, loading rank 0's object-store copy
    assert manager.workers[0] is not victim and manager.last_timings["restarts"] == 1
    assert_same(samples, reference_samples(setup["model"], current), 2)
    # The next broadcast rebuilds the group with the new worker in it.
    learner.train_step(make_batch(setup["tok"], 8, seed=1))
    manager.broadcast_weights(3)
    assert_same(
        manager.generate(groups(), GREEDY),
        reference_samples(setup["model"], learner.state_dict_for_sync()),
        3,
    )
