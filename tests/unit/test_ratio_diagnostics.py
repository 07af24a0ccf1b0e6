"""The per-step ratio diagnostics of update_policy (`ratio/*`), by hand, on a fake learner whose log-probs
are scripted per minibatch: quantiles of r = exp(logp - old_logp) over every trained token of the step,
the fractions past the loss's bounds, and mean |log r| of the first and the last minibatch."""

import math

import pytest
import torch

from cispo.core.config import AlgorithmConfig
from cispo.core.types import Sample, StepResult, TrainBatch
from cispo.driver.batch import build_train_batch
from cispo.driver.update import RATIO_CAP_KEYS, RATIO_KEYS, ratio_bounds, train_keys, update_policy

# Per minibatch in update order: the ratios r of its response tokens, row-major. Minibatch 0 is taken
# before any update (r = 1: no train/inference mismatch); minibatch 1 after one.
SCRIPT = [[1.0, 1.0, 1.0, 1.0], [6.0, 3.0, 0.5, 0.5]]
ALL = sorted(r for part in SCRIPT for r in part)  # [0.5, 0.5, 1, 1, 1, 1, 3, 6]


class FakeLearner:
    """Returns, for every minibatch asked, old_logprobs + log r on the response tokens (r from SCRIPT) and
    garbage (+100) elsewhere, which the diagnostics must ignore."""

    def __init__(self) -> None:
        self.flags: list[bool] = []

    def train_steps(self, minibatches: list[TrainBatch], return_logprobs: list[bool]) -> list[StepResult]:
        self.flags = list(return_logprobs)
        results = []
        for index, (batch, flag) in enumerate(zip(minibatches, return_logprobs, strict=True)):
            logprobs = batch.old_logprobs + 100.0
            mask = batch.response_mask.bool()
            log_r = torch.tensor([math.log(r) for r in SCRIPT[index]])
            logprobs[mask] = batch.old_logprobs[mask] + log_r
            results.append(StepResult({"loss": 0.0, "grad_norm": 1.0}, logprobs if flag else None))
        return results


def _batch() -> TrainBatch:
    """4 rows of 2 response tokens each after prompts of 3 or 4 tokens (so the rows are padded)."""
    samples = [
        Sample(i % 2, list(range(3 + i % 2)), [5, 6], [-1.0 - i, -2.0], "eos", policy_version=0)
        for i in range(4)
    ]
    return build_train_batch(samples, torch.tensor([1.0, -1.0, 0.5, -0.5]), pad_token_id=0)


def _update(loss: str, **loss_kwargs: float) -> tuple[dict[str, float], FakeLearner]:
    learner = FakeLearner()
    algo = AlgorithmConfig(loss=loss, loss_kwargs=loss_kwargs, updates_per_batch=2)
    return update_policy(learner, _batch(), algo, torch.Generator().manual_seed(0)), learner


def test_quantiles_and_drift_by_hand():
    out, learner = _update("cispo", eps_low=1.0, eps_high=4.0)
    assert learner.flags == [True, True]  # every minibatch's log-probs, not only the first
    # numpy's linear interpolation: position q * (n - 1) in the sorted 8 values.
    assert out["ratio/p50"] == pytest.approx(1.0)  # between ALL[3] = 1 and ALL[4] = 1
    assert out["ratio/p90"] == pytest.approx(3.0 + 0.3 * (6.0 - 3.0), rel=1e-6)  # position 6.3
    assert out["ratio/p99"] == pytest.approx(3.0 + 0.93 * (6.0 - 3.0), rel=1e-6)  # position 6.93
    assert out["ratio/max"] == pytest.approx(6.0, rel=1e-6)
    assert out["ratio/abs_log_first"] == pytest.approx(0.0, abs=1e-6)
    last = (math.log(6) + math.log(3) + 2 * math.log(2)) / 4
    assert out["ratio/abs_log_last"] == pytest.approx(last, rel=1e-6)
    # CISPO at eps_high 4: [0, 5]; only r = 6 is past the cap, nothing can be below 0.
    assert out["ratio/cap_frac_high"] == pytest.approx(1 / 8)
    assert out["ratio/cap_frac_low"] == 0.0
    # The train/infer check still comes from the first minibatch alone (r = 1 there).
    assert out["train_infer/logprob_max_abs_diff"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("loss", "kwargs", "high", "low"),
    [
        ("cispo", {"eps_high": 2.0}, 1 / 8, 0.0),  # [0, 3]: r = 6 only (3 is not past 3)
        ("cispo", {"eps_low": 0.4, "eps_high": 1.0}, 2 / 8, 2 / 8),  # [0.6, 2]: 3, 6 above; 0.5, 0.5 below
        ("dapo", {}, 2 / 8, 2 / 8),  # [0.8, 1.28]: 3, 6 above; 0.5, 0.5 below
        ("grpo", {"eps": 0.1}, 2 / 8, 2 / 8),
    ],
)
def test_cap_fractions_follow_each_loss_bounds(loss: str, kwargs: dict, high: float, low: float):
    out, _ = _update(loss, **kwargs)
    assert out["ratio/cap_frac_high"] == pytest.approx(high)
    assert out["ratio/cap_frac_low"] == pytest.approx(low)


def test_bounds_by_loss_with_the_loss_defaults():
    assert ratio_bounds("cispo", {"eps_low": 1.0, "eps_high": 4.0}) == (0.0, 5.0)
    assert ratio_bounds("cispo", {}) == (0.0, 5.0)  # the loss function's own defaults
    assert ratio_bounds("dapo", {}) == pytest.approx((0.8, 1.28))
    assert ratio_bounds("dapo", {"eps_high": 0.4}) == pytest.approx((0.8, 1.4))
    assert ratio_bounds("grpo", {"eps": 0.1}) == pytest.approx((0.9, 1.1))
    assert ratio_bounds("my.pkg:loss", {"eps": 0.1}) is None


def test_a_loss_without_known_bounds_gets_the_quantiles_but_no_cap_fractions():
    out, _ = _update("tests.unit.test_ratio_diagnostics:unused_loss")
    assert out["ratio/max"] == pytest.approx(6.0, rel=1e-6)
    assert not any(key in out for key in RATIO_CAP_KEYS)
    assert set(RATIO_KEYS) <= set(train_keys("cispo")) and set(RATIO_CAP_KEYS) <= set(train_keys("cispo"))
    assert not set(RATIO_CAP_KEYS) & set(train_keys("pkg.mod:fn"))


def unused_loss(*args: object, **kwargs: object) -> None:  # a dotted-path loss the fake learner never calls
    raise AssertionError("not called")
