"""The staged budget: both advance conditions on synthetic metric streams, stage settings that reach the
learner and the sampler, and a mid-stage checkpoint that resumes in the same stage."""

import math
from types import SimpleNamespace

import pytest
import torch

from cispo.core.config import CurriculumConfig, LearnerConfig, StageConfig
from cispo.driver.curriculum import LengthCurriculum
from cispo.driver.loop import apply_stage
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax
from tests.unit.test_config import composed, to_train_config


def curriculum(**overrides) -> LengthCurriculum:
    stages = [StageConfig(budget=16), StageConfig(budget=24, lr=1e-4, grad_clip=0.5), StageConfig(budget=32)]
    fields = {"enabled": True, "stages": stages, "patience": 2, "perplexity_window": 2, **overrides}
    return LengthCurriculum(CurriculumConfig(**fields), default_budget=8)


def feed(c: LengthCurriculum, stream: list[tuple[float, float]]) -> list[int]:
    """The step indices (from 1) at which the stage advanced."""
    return [i for i, (p99, ppl) in enumerate(stream, 1) if c.observe(p99, ppl)]


def test_advances_exactly_when_both_conditions_hold():
    c = curriculum()
    # p99 near the window (>= 0.95 x 16) from step 1; the perplexity settles at 1.5 from step 3, so the
    # last window of 2 matches the one before only at step 6 (1.505 vs 1.5: 0.3% < 2%).
    stream = [(16, 3.0), (16, 2.0), (16, 1.5), (16, 1.5), (16, 1.5), (16, 1.51)]
    assert feed(c, stream) == [6]
    assert c.stage == 1 and c.budget == 24
    assert c.signals["curriculum/perplexity_change"] == pytest.approx(0.005 / 1.5)


def test_length_alone_is_not_enough_and_a_short_step_resets_the_streak():
    c = curriculum()
    flat = [(16, 2.0)] * 3 + [(10, 2.0)] + [(16, 2.0)]
    assert feed(c, flat) == []  # converged perplexity, but the short step at 4 broke the streak
    assert c.signals["curriculum/length_streak"] == 1
    assert feed(c, [(16, 2.0)]) == [1]


def test_either_condition_can_be_switched_off_and_the_last_stage_is_final():
    only_length = curriculum(perplexity_condition=False)
    assert feed(only_length, [(16, 9.0), (16, 1.0)]) == [2]
    assert feed(only_length, [(24, 9.0), (24, 1.0), (32, 1.0), (32, 1.0), (32, 1.0)]) == [2]
    assert only_length.stage == 2 and only_length.budget == 32  # the last stage: no further
    only_perplexity = curriculum(length_condition=False)
    assert feed(only_perplexity, [(1, 2.0)] * 4) == [4]
    with pytest.raises(ValueError, match="switch on length_condition or perplexity_condition"):
        curriculum(length_condition=False, perplexity_condition=False)


def test_a_mid_stage_checkpoint_resumes_in_the_same_stage_with_its_counters():
    c = curriculum()
    feed(c, [(16, 2.0)] * 4 + [(24, 4.0), (24, 4.0)])
    assert c.stage == 1
    resumed = curriculum()
    resumed.load_state_dict(c.state_dict())
    assert (resumed.stage, resumed.state_dict()) == (1, c.state_dict())
    assert resumed.state_dict()["streak"] == 2 and resumed.state_dict()["perplexity"] == [4.0, 4.0]
    assert feed(resumed, [(24, 4.0), (24, 4.02)]) == feed(c, [(24, 4.0), (24, 4.02)]) == [2]


class RecordingLoss:
    def __init__(self) -> None:
        self.kwargs: list[dict] = []

    def __call__(self, *args, **kwargs):
        from cispo.algo.losses import cispo_loss

        self.kwargs.append({k: v for k, v in kwargs.items() if k != "token_weights"})
        return cispo_loss(*args, **kwargs)


def test_stage_settings_change_what_the_learner_and_the_sampler_use():
    cfg = to_train_config(composed("curriculum=staged_80k"))
    model, tok = tiny_minimax()
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1, warmup_steps=0), algorithm=cfg.algorithm
    )
    learner.loss_fn = RecordingLoss()
    c = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    c.load_state_dict({"stage": 4, "streak": 0})  # the 72K stage: grad clip 0.3, eps_high 2.0, sample_token
    stages = SimpleNamespace(curriculum=c, learner=learner, rollout=SimpleNamespace(overrides={}))
    apply_stage(cfg, stages)
    learner.train_step(make_batch(tok, n=4))
    assert learner.loss_fn.kwargs[-1] == {"eps_low": 1.0, "eps_high": 2.0, "token_mask": False}
    assert learner.cfg.grad_clip == 0.3 and learner.algorithm.normalizer == "sample_token"
    learner.apply_settings(lr=1e-3)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert c.logged()["curriculum/eps_high"] == 2.0 and c.logged()["curriculum/grad_clip"] == 0.3
    assert c.logged()["curriculum/budget"] == 73728 and c.logged()["curriculum/stage"] == 4


def test_stage_temperature_and_repetition_stop_reach_sampling():
    from cispo.driver.rollout_stage import RolloutStage

    cfg = to_train_config(composed("curriculum=staged_80k"))
    cfg.curriculum.stages[1] = StageConfig(budget=49152, temperature=0.8, repetition_stop_tokens=3000)
    c = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    c.load_state_dict({"stage": 1, "streak": 0})
    rollout = RolloutStage(cfg, SimpleNamespace(eos_token_id=1, pad_token_id=0), None, (None, None), None, [])
    calls = []
    learner = SimpleNamespace(apply_settings=lambda **s: calls.append(s))
    apply_stage(cfg, SimpleNamespace(curriculum=c, learner=learner, rollout=rollout))
    params = rollout.sampling(c.budget)
    assert (params.temperature, params.repetition_stop_tokens, params.max_new_tokens) == (0.8, 3000, 49152)
    assert calls[-1]["temperature"] == 0.8  # the learner's log-probs follow the sampling temperature


def test_stage_loss_kwargs_are_checked_at_start_up():
    with pytest.raises(
        ValueError, match=r"curriculum\.stages\[3\]\.loss_kwargs: cispo_loss takes no argument \['eps'\]"
    ):
        to_train_config(composed("curriculum=staged_80k", "+curriculum.stages.3.loss_kwargs.eps=0.2"))
    with pytest.raises(ValueError, match=r"curriculum\.stages\[1\]\.grad_clip: must be >= 0"):
        to_train_config(composed("curriculum=staged_80k", "curriculum.stages.1.grad_clip=-1"))


def test_generation_perplexity_is_logged_from_behaviour_logprobs():
    from cispo.core.types import Sample
    from cispo.driver.rollout_stage import rollout_metrics

    samples = [
        Sample(0, [1], [2, 3], [math.log(0.5), math.log(0.25)], "eos", 0),
        Sample(0, [1], [4], [math.log(0.5)], "eos", 0),
    ]
    metrics = rollout_metrics(samples, samples, 0)
    assert metrics["rollout/perplexity"] == pytest.approx(math.exp(-(3 * math.log(0.5) + math.log(0.5)) / 3))
    assert torch.isfinite(torch.tensor(metrics["rollout/perplexity"]))
