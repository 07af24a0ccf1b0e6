"""K minibatch updates in one learner call (train_steps) are the K train_step calls they replace: same
weights, same per-minibatch metrics, log-probs where asked; the driver makes one call per rollout batch."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.driver.batch import split_minibatches
from cispo.driver.update import update_policy
from cispo.learner import build_learner
from cispo.learner.torch_learner import TorchLearner
from tests.learner.helpers import make_batch, tiny_minimax

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))

K = 3
# ZeRO-2 over 2 ranks against itself: the same engine, the same requests in the same order, so the
# weights should agree exactly; 1e-6 leaves room only for a reordered gloo reduction (one AdamW step at
# lr 1e-2 moves a weight by ~1e-2, so a lost or repeated step shows).
DS_ATOL = 1e-6


def cfg(num_ranks: int = 1) -> LearnerConfig:
    # 18 tokens per micro-batch: each minibatch runs several micro-batches (accumulation inside a step).
    return LearnerConfig(
        lr=1e-2, warmup_steps=0, num_threads=1, zero_stage=2, num_ranks=num_ranks, micro_batch_tokens=18
    )


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 12)
    minibatches = split_minibatches(batch, K, torch.Generator().manual_seed(0))
    return {"model": model, "minibatches": minibatches, "algorithm": AlgorithmConfig(normalizer="group")}


def _one_by_one(learner, minibatches):
    return [learner.train_step(mb, return_logprobs=i == 0) for i, mb in enumerate(minibatches)]


def _assert_same_results(together, apart, atol):
    assert len(together) == len(apart) == K
    for one, other in zip(together, apart):
        assert one.metrics.keys() == other.metrics.keys()
        for key, value in one.metrics.items():
            assert value == pytest.approx(other.metrics[key], abs=atol, nan_ok=True), key
    assert together[0].logprobs is not None and all(r.logprobs is None for r in together[1:])
    torch.testing.assert_close(together[0].logprobs, apart[0].logprobs, atol=atol, rtol=0)


def test_torch_k_updates_in_one_call_match_k_calls_exactly(setup):
    algorithm, minibatches = setup["algorithm"], setup["minibatches"]
    together = build_learner("torch", model=copy.deepcopy(setup["model"]), cfg=cfg(), algorithm=algorithm)
    apart = build_learner("torch", model=copy.deepcopy(setup["model"]), cfg=cfg(), algorithm=algorithm)
    results = together.train_steps(minibatches, [True] + [False] * (K - 1))
    _assert_same_results(results, _one_by_one(apart, minibatches), atol=0)
    assert together.version == apart.version == K
    before = setup["model"].state_dict()
    for name, tensor in together.state_dict_for_sync().items():
        assert torch.equal(tensor, apart.state_dict_for_sync()[name]), name
    moved = max((t - before[n]).abs().max().item() for n, t in together.state_dict_for_sync().items())
    assert moved > 1e-3  # the K steps really changed the weights


class CountingLearner(TorchLearner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def train_steps(self, minibatches, return_logprobs=None):
        self.calls.append(len(minibatches))
        return super().train_steps(minibatches, return_logprobs)


def test_driver_makes_one_learner_call_per_rollout_batch(setup):
    model, tok = tiny_minimax()
    algorithm = AlgorithmConfig(updates_per_batch=4)
    learner = CountingLearner(model, cfg(), algorithm)
    metrics = update_policy(learner, make_batch(tok, 8), algorithm, torch.Generator().manual_seed(0))
    assert learner.calls == [4] and learner.version == 4
    assert "train_infer/logprob_corr" in metrics  # the first minibatch's log-probs came back


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_k_updates_in_one_call_match_k_calls(setup):
    algorithm, minibatches = setup["algorithm"], setup["minibatches"]
    states, results = [], []
    for together in (True, False):
        learner = build_learner(
            "deepspeed", model=copy.deepcopy(setup["model"]), cfg=cfg(num_ranks=2), algorithm=algorithm
        )
        try:
            if together:
                results.append(learner.train_steps(minibatches, [True] + [False] * (K - 1)))
            else:
                results.append(_one_by_one(learner, minibatches))
            assert learner.version == K
            states.append(learner.state_dict_for_sync())
        finally:
            learner.close()
    _assert_same_results(*results, atol=DS_ATOL)
    for name, tensor in states[0].items():
        torch.testing.assert_close(tensor, states[1][name], atol=DS_ATOL, rtol=0, msg=name)
    before = setup["model"].state_dict()
    assert max((t - before[n]).abs().max().item() for n, t in states[0].items()) > 1e-3
