"""One owner of metric reduction, StepResult from train_step, metric names by algorithm, eval sampling."""

import math

import pytest
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig, RolloutConfig, TrainConfig
from cispo.core.metrics import combine_metrics
from cispo.core.types import StepResult, TrainBatch
from cispo.driver.rollout_stage import RolloutStage
from cispo.driver.update import train_keys, update_policy
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax


def test_combine_metrics_by_name_with_hand_computed_values():
    parts = [
        {"clip_frac": 0.1, "is_weight_max": 2.0, "ratio_min": 0.5, "lr": 1e-5, "only_first": 4.0},
        {"clip_frac": 0.3, "is_weight_max": 5.0, "ratio_min": 0.25, "lr": 2e-5},
    ]
    out = combine_metrics(parts, [0.25, 0.75])
    assert out["clip_frac"] == pytest.approx(0.25 * 0.1 + 0.75 * 0.3)  # weighted mean of means
    assert out["is_weight_max"] == 5.0 and out["ratio_min"] == 0.25  # max of maxima, min of minima
    assert out["lr"] == 2e-5  # the last value
    assert out["only_first"] == 4.0  # averaged over the parts that report it
    assert combine_metrics(parts)["clip_frac"] == pytest.approx(0.2)  # equal weights by default
    with pytest.raises(ValueError, match="2 metric parts but 1 weights"):
        combine_metrics(parts, [1.0])


class ScriptedLearner:
    """A learner whose minibatch metrics are given, to check how the driver combines them."""

    def __init__(self, per_step: list[dict[str, float]]) -> None:
        self.per_step, self.version = list(per_step), 0

    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult:
        self.version += 1
        logprobs = batch.old_logprobs.clone() if return_logprobs else None
        return StepResult(self.per_step.pop(0), logprobs)

    def train_steps(self, minibatches: list[TrainBatch], return_logprobs: list[bool]) -> list[StepResult]:
        return [self.train_step(batch, flag) for batch, flag in zip(minibatches, return_logprobs)]


def _scripted_update(loss: str) -> dict[str, float]:
    per_step = [
        {"loss": 1.0, "clip_frac": 0.1, "is_weight_max": 2.0, "grad_norm": 1.0, "lr": 1e-5, "entropy": 0.5},
        {"loss": 3.0, "clip_frac": 0.3, "is_weight_max": 5.0, "grad_norm": 3.0, "lr": 2e-5, "entropy": 0.7},
    ]
    batch = make_batch(tiny_minimax()[1], n=8)
    algo = AlgorithmConfig(loss=loss, updates_per_batch=2)
    return update_policy(ScriptedLearner(per_step), batch, algo, torch.Generator().manual_seed(0))


def test_minibatch_metrics_mean_of_means_max_of_maxima_last_lr():
    out = _scripted_update("cispo")
    assert out["cispo/loss"] == pytest.approx(2.0) and out["cispo/clip_frac"] == pytest.approx(0.2)
    assert out["cispo/is_weight_max"] == 5.0  # the old driver averaged maxima: 3.5
    assert out["actor/lr"] == 2e-5 and out["actor/grad_norm"] == pytest.approx(2.0)
    assert out["entropy"] == pytest.approx(0.6)
    assert out["train_infer/logprob_max_abs_diff"] == 0.0  # the scripted learner echoes the engine


@pytest.mark.parametrize(("loss", "prefix"), [("grpo", "grpo"), ("dapo", "dapo"), ("my.pkg:loss", "actor")])
def test_loss_metrics_are_named_for_the_algorithm(loss: str, prefix: str):
    out = _scripted_update(loss)
    assert out[f"{prefix}/clip_frac"] == pytest.approx(0.2)
    assert not any(key.startswith("cispo/") for key in out)
    assert f"{prefix}/clip_frac" in train_keys(loss) and "cispo/clip_frac" not in train_keys(loss)


def test_train_step_returns_step_result_with_float_metrics():
    model, tok = tiny_minimax()
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    batch = make_batch(tok, n=4)
    result = learner.train_step(batch, return_logprobs=True)
    assert isinstance(result, StepResult)
    assert all(isinstance(v, float) for v in result.metrics.values())
    assert result.logprobs is not None and result.logprobs.shape == batch.old_logprobs.shape
    assert learner.train_step(batch).logprobs is None
    assert math.isfinite(result.metrics["loss"]) and result.metrics["lr"] > 0


class _Tok:
    eos_token_id, pad_token_id = 1, 0


@pytest.mark.parametrize(("eval_temperature", "greedy"), [(0.0, True), (0.7, False)])
def test_eval_sampling_follows_rollout_eval_temperature(eval_temperature: float, greedy: bool):
    cfg = TrainConfig(rollout=RolloutConfig(temperature=1.0, top_k=5, eval_temperature=eval_temperature))
    stage = RolloutStage(cfg, _Tok(), manager=None, scorers=(None, None), stream=None, eval_set=[])
    params = stage.sampling(budget=12, evaluation=True)
    assert params.max_new_tokens == 12
    assert (params.top_k, params.temperature) == ((1, 1.0) if greedy else (5, 0.7))
    train = stage.sampling(budget=12)
    assert (train.top_k, train.temperature) == (5, 1.0)


def test_stop_on_eos_false_runs_training_responses_to_the_budget_but_not_evaluation():
    cfg = TrainConfig(rollout=RolloutConfig(stop_on_eos=False))
    stage = RolloutStage(cfg, _Tok(), manager=None, scorers=(None, None), stream=None, eval_set=[])
    assert stage.sampling(budget=12).eos_token_ids == ()
    assert stage.sampling(budget=12, evaluation=True).eos_token_ids == (1,)
    default = RolloutStage(
        TrainConfig(), _Tok(), manager=None, scorers=(None, None), stream=None, eval_set=[]
    )
    assert default.sampling(budget=12).eos_token_ids == (1,)
