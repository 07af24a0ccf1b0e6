"""The staged budget: both advance conditions on synthetic rollout statistics, one StageSettings that
reaches the learner and the sampler, and a mid-stage checkpoint that resumes in the same stage."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from cispo.core.config import AlgorithmConfig, CurriculumConfig, LearnerConfig, StageConfig
from cispo.core.stage import StageSettings
from cispo.core.types import RolloutStats
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
    return [i for i, (p99, ppl) in enumerate(stream, 1) if c.observe(stats(p99, ppl))]


def stats(p99: float, perplexity: float) -> RolloutStats:
    return RolloutStats(p99_length=p99, perplexity=perplexity, mean_length=p99 / 2, max_length=p99)


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


class RecordingRollout:
    def __init__(self) -> None:
        self.settings: list[StageSettings] = []

    def apply_settings(self, settings: StageSettings) -> None:
        self.settings.append(settings)


def test_the_curriculum_gives_one_stage_settings_with_every_field_the_stage_sets():
    cfg = to_train_config(composed("curriculum=staged_80k"))
    c = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    c.load_state_dict({"stage": 4, "streak": 0})  # the 72K stage: grad clip 0.3, eps_high 2.0, sample_token
    settings = c.stage_settings({"eps_low": 1.0, "eps_high": 4.0, "token_mask": False})
    assert settings == StageSettings(
        budget=73728,
        grad_clip=0.3,
        normalizer="sample_token",
        loss_kwargs={"eps_low": 1.0, "eps_high": 2.0, "token_mask": False},
    )
    assert LengthCurriculum(CurriculumConfig(), 64).stage_settings({}) is None  # no curriculum: nothing set
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="StageSettings.temperature must be > 0"):
        StageSettings(budget=8, temperature=0.0)


def test_apply_stage_hands_the_same_settings_to_the_learner_and_the_rollout():
    cfg = to_train_config(composed("curriculum=staged_80k"))
    cfg.curriculum.stages[1] = StageConfig(budget=49152, temperature=0.8, repetition_stop_tokens=3000)
    c = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    c.load_state_dict({"stage": 1, "streak": 0})
    learner, rollout = RecordingRollout(), RecordingRollout()
    apply_stage(cfg, SimpleNamespace(curriculum=c, learner=learner, rollout=rollout))
    (settings,) = learner.settings
    assert rollout.settings == [settings] and rollout.settings[0] is settings
    assert (settings.budget, settings.temperature, settings.repetition_stop_tokens) == (49152, 0.8, 3000)
    assert settings.loss_kwargs == cfg.algorithm.loss_kwargs and settings.lr is None


def _learner(model, lr: float = 1e-2, eps_high: float = 4.0):
    return build_learner(
        "torch",
        model=model,
        cfg=LearnerConfig(lr=lr, warmup_steps=0, num_threads=1, weight_decay=0.0),
        algorithm=AlgorithmConfig(loss_kwargs={"eps_low": 1.0, "eps_high": eps_high}),
    )


def test_stage_settings_change_the_torch_learners_lr_and_eps_high():
    model, tok = tiny_minimax()
    batch = make_batch(tok, n=4)
    plain, staged = _learner(copy.deepcopy(model)), _learner(copy.deepcopy(model))
    # Every ratio far above 1 + eps_high (old log-probs 10 nats below the policy's), so every IS weight is
    # clipped to 1 + eps_high and the loss is -(1 + eps_high) * sum(c * A * logp): proportional to it.
    batch.old_logprobs = (plain.compute_logprobs(batch) - 10.0) * batch.response_mask
    staged.apply_settings(StageSettings(budget=8, lr=1e-3, loss_kwargs={"eps_low": 1.0, "eps_high": 2.0}))
    before = {k: v.clone() for k, v in staged.state_dict_for_sync().items()}
    loss_plain = plain.train_step(batch).metrics["loss"]
    result = staged.train_step(batch).metrics
    assert result["loss"] == pytest.approx(loss_plain * (1 + 2.0) / (1 + 4.0), rel=1e-5)
    assert result["is_weight_max"] == pytest.approx(3.0) and result["clip_frac_high"] == pytest.approx(1.0)
    # AdamW's first step (no weight decay, eps 1e-15) moves every weight with a gradient by lr * sign(g):
    # the stage's lr of 1e-3, not the config's 1e-2.
    moved = max((v - before[k]).abs().max().item() for k, v in staged.state_dict_for_sync().items())
    assert moved == pytest.approx(1e-3, rel=1e-4)
    assert result["lr"] == pytest.approx(1e-3)


def test_stage_temperature_reaches_the_learners_logprobs():
    model, tok = tiny_minimax()
    batch = make_batch(tok, n=4)
    learner = _learner(model)
    at_one = learner.compute_logprobs(batch)
    learner.apply_settings(StageSettings(budget=8, temperature=0.5))
    assert learner.temperature == 0.5
    at_half = learner.compute_logprobs(batch)
    mask = batch.response_mask.bool()
    assert not torch.allclose(at_one[mask], at_half[mask])
    learner.apply_settings(StageSettings(budget=8))  # nothing set: nothing changes
    assert torch.equal(learner.compute_logprobs(batch), at_half) and learner.temperature == 0.5


def test_stage_temperature_and_repetition_stop_reach_sampling():
    from cispo.driver.rollout_stage import RolloutStage

    cfg = to_train_config(composed("curriculum=staged_80k"))
    cfg.curriculum.stages[1] = StageConfig(budget=49152, temperature=0.8, repetition_stop_tokens=3000)
    c = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    c.load_state_dict({"stage": 1, "streak": 0})
    rollout = RolloutStage(cfg, SimpleNamespace(eos_token_id=1, pad_token_id=0), None, (None, None), None, [])
    learner = RecordingRollout()
    apply_stage(cfg, SimpleNamespace(curriculum=c, learner=learner, rollout=rollout))
    params = rollout.sampling(c.budget)
    assert (params.temperature, params.repetition_stop_tokens, params.max_new_tokens) == (0.8, 3000, 49152)
    assert learner.settings[-1].temperature == 0.8  # the learner's log-probs follow the sampling temperature


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
