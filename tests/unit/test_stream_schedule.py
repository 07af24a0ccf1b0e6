"""The rollout stage's schedule without Ray: a LocalRolloutManager, a tiny model per policy version, the
built-in addition data. With algorithm.max_staleness = k, step t's groups are generated at the version
published at the end of step t-1-k, batches come in data order, the staleness metric is min(k, t-1), and a
checkpoint's state carries the steps drawn ahead (scored) into a new stage.

Sampling is top-k 1 (exact greedy), so every sample names the weights it was generated with: its tokens
are the greedy continuation of exactly one version's model."""

from __future__ import annotations

import pytest
import torch

from cispo.core.config import AlgorithmConfig, DataConfig, RewardConfig, TrainConfig
from cispo.core.rollout_config import RolloutConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import Sample
from cispo.driver.build import build_scorers
from cispo.driver.data import PromptStream, load_split
from cispo.driver.policy import load_tokenizer
from cispo.driver.rollout_stage import RolloutStage
from rollout.manager import LocalRolloutManager
from tests.rollout.conftest import greedy_full_forward

pytestmark = pytest.mark.timeout(300)  # a hang guard: a job no engine can run is waited for forever

K, STEPS, PROMPTS, BUDGET = 2, 6, 3, 5
TOK = load_tokenizer("builtin:char")


def _model(seed: int) -> torch.nn.Module:
    return tiny_lm("qwen2", seed, vocab_size=len(TOK), hidden_size=32, intermediate_size=64).eval()


MODELS = [_model(10 + v) for v in range(STEPS + 1)]  # the learner's weights after v steps


class VersionedLearner:
    """What sync_weights needs of a learner: its version, and its weights (those of MODELS[version])."""

    def __init__(self) -> None:
        self.version = 0

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return MODELS[self.version].state_dict()


def _cfg() -> TrainConfig:
    return TrainConfig(
        data=DataConfig(num_train=64, num_eval=0, prompts_per_step=PROMPTS),
        rollout=RolloutConfig(backend="local", top_k=1, groups_per_task=1, max_batch_size=8),
        reward=RewardConfig(isolation="thread"),
        algorithm=AlgorithmConfig(group_size=2, max_staleness=K),
    )


def _stage(engine_model: torch.nn.Module) -> RolloutStage:
    cfg = _cfg()
    manager = LocalRolloutManager("hf", {"model": engine_model, "max_batch_size": 8, "num_threads": 1})
    stream = PromptStream(load_split(cfg.data, "train"), TOK, cfg.data, cfg.algorithm.group_size)
    return RolloutStage(cfg, TOK, manager, build_scorers(cfg), stream, [])


def _greedy(version: int, prompt: list[int]) -> list[int]:
    return greedy_full_forward(MODELS[version], prompt, BUDGET)


def _made_by(sample: Sample) -> set[int]:
    """The versions whose greedy continuation the sample is (up to its own end at EOS)."""
    n = len(sample.response_ids)
    return {v for v in range(len(MODELS)) if _greedy(v, sample.prompt_ids)[:n] == sample.response_ids}


def _step(stage: RolloutStage, learner: VersionedLearner, step: int) -> tuple[list[Sample], dict]:
    """One step as the loop runs it: schedule, collect, 'train' (the next version), sync."""
    stage.schedule(step, BUDGET, STEPS)
    samples, metrics = stage.collect(step, learner.version)
    learner.version += 1
    stage.sync_weights(learner, step)
    return samples, metrics


def test_each_step_is_generated_at_the_version_published_k_steps_earlier_in_data_order():
    stage, learner = _stage(MODELS[0]), VersionedLearner()
    try:
        stage.sync_weights(learner, 0, force=True)  # as run_loop does with max_staleness > 0
        for t in range(1, STEPS + 1):
            samples, metrics = _step(stage, learner, t)
            expected = max(0, t - 1 - K)  # the version published at the end of step t-1-K (0: initial)
            assert {s.policy_version for s in samples} == {expected}, f"step {t}"
            for s in samples:  # the tokens are those of that version's weights, and of no other
                assert _made_by(s) == {expected}, f"step {t}: {s.response_ids}"
            first = (t - 1) * PROMPTS
            assert stage.last_batch == list(range(first, first + PROMPTS))
            assert [s.group_index for s in samples] == [i for i in stage.last_batch for _ in range(2)]
            assert metrics["rollout/staleness_max"] == min(K, t - 1)
            assert metrics["rollout/policy_lag"] == (t - 1) - expected
    finally:
        stage.close()


def _batch(samples: list[Sample]) -> list[tuple]:
    return [(s.group_index, s.response_ids, s.policy_version, s.reward) for s in samples]


def test_state_dict_round_trips_the_steps_drawn_ahead():
    original, learner = _stage(MODELS[0]), VersionedLearner()
    # The restored stage's engine starts from other weights: a group of the state generated again (at
    # version 0) instead of taken from it would come out different.
    restored, restored_learner = _stage(_model(99)), VersionedLearner()
    try:
        original.sync_weights(learner, 0, force=True)
        for t in (1, 2):
            _step(original, learner, t)
        state = original.state_dict()
        assert state["cursor"] == (2 + K) * PROMPTS  # steps 3 and 4 drawn ahead
        assert sorted(g["key"][1] for g in state["groups"]) == [3] * PROMPTS + [4] * PROMPTS
        restored.load_state_dict(state)
        restored_learner.version = learner.version
        restored.sync_weights(restored_learner, 2, force=True)  # as Loop.restore does
        for t in range(3, STEPS + 1):
            want, want_metrics = _step(original, learner, t)
            got, got_metrics = _step(restored, restored_learner, t)
            assert _batch(got) == _batch(want), f"step {t}"
            assert [s.behaviour_logprobs for s in got] == [s.behaviour_logprobs for s in want]
            assert restored.last_batch == original.last_batch
            assert got_metrics["rollout/staleness_max"] == want_metrics["rollout/staleness_max"] == K
        assert {s.policy_version for s in got} == {STEPS - 1 - K}
    finally:
        original.close()
        restored.close()


def test_steps_without_an_update_do_not_age_the_samples():
    """A step whose groups all had equal rewards trains nothing: the learner's version, and so the
    weights, stay as they were. Staleness counts weight syncs that changed the weights, so it stays within
    max_staleness (a sample at the learner's own version is 0 syncs old), and equals the version lag here
    (each update is one version)."""
    stage, learner = _stage(MODELS[0]), VersionedLearner()
    updates = {1: False, 2: False, 3: True, 4: False, 5: True, 6: True}  # step -> did it train?
    try:
        stage.sync_weights(learner, 0, force=True)
        for t in range(1, STEPS + 1):
            stage.schedule(t, BUDGET, STEPS)
            samples, metrics = stage.collect(t, learner.version)
            lag = learner.version - min(s.policy_version for s in samples)
            assert metrics["rollout/staleness_max"] == lag <= K, f"step {t}"
            learner.version += updates[t]
            stage.sync_weights(learner, t)
    finally:
        stage.close()
