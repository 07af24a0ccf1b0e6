"""DAPO's overlong reward shaping (cispo.driver.shaping), by hand-computed values: the penalty of eq. 13
with L_max = the sample's own generation budget and L_cache = algorithm.overlong_buffer * L_max, the group
advantages of shaped rewards, its metrics, the config's checks, and the budget a batch drawn ahead was
generated with (a curriculum stage change moves the window of later steps only)."""

from __future__ import annotations

import math

import pytest
import torch

from cispo.algo.advantages import get_advantage
from cispo.core.config import AlgorithmConfig, DataConfig, RewardConfig, TrainConfig
from cispo.core.rollout_config import RolloutConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import Sample
from cispo.driver.build import build_scorers
from cispo.driver.data import PromptStream, load_split
from cispo.driver.policy import load_tokenizer
from cispo.driver.rollout_stage import RolloutStage
from cispo.driver.shaping import cache_tokens, overlong_penalties, shaped_rewards
from cispo.driver.update import make_train_batch
from rollout.manager import LocalRolloutManager
from tests.unit.test_config import composed, to_train_config

DAPO = AlgorithmConfig(loss="dapo", group_size=4, overlong_buffer=0.2, overlong_penalty=1.0)


def _sample(length: int, reward: float, group: int = 0) -> Sample:
    return Sample(group, [1, 2], [3] * length, [-0.5] * length, "eos", 0, reward=reward)


def test_cache_tokens_is_the_buffer_share_of_the_budget():
    assert cache_tokens(20480, 0.2) == 4096  # DAPO's L_cache of L_max
    assert cache_tokens(20, 0.2) == 4 and cache_tokens(40, 0.2) == 8
    assert cache_tokens(24, 0.2) == 5  # round(4.8)
    assert cache_tokens(2, 0.2) == 1  # never an empty window
    with pytest.raises(ValueError, match="budget"):
        cache_tokens(0, 0.2)


def test_penalty_below_inside_and_at_the_window_for_two_budgets():
    # Budget 20: L_cache 4, the window is (16, 20]: (16 - n) / 4 inside it, -1 at the cap.
    lengths = [10, 16, 17, 18, 19, 20]
    got = overlong_penalties(lengths, [20] * 6, 0.2, 1.0).tolist()
    assert got == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    # Budget 40 (a later curriculum stage): L_cache 8, the window is (32, 40].
    got = overlong_penalties([18, 32, 34, 38, 40], [40] * 5, 0.2, 1.0).tolist()
    assert got == [0.0, 0.0, -0.25, -0.75, -1.0]
    # The same 18 tokens: half the penalty under budget 20, none under 40; scaled by overlong_penalty.
    assert overlong_penalties([18, 18], [20, 40], 0.2, 0.5).tolist() == [-0.25, 0.0]
    assert overlong_penalties([20, 40], [20, 40], 0.2, 2.0).tolist() == [-2.0, -2.0]
    assert overlong_penalties([25], [20], 0.2, 1.0).tolist() == [-1.0]  # past the cap (not generated)
    assert overlong_penalties([20], [20], 0.0, 1.0).tolist() == [0.0]  # buffer 0: off


def test_shaped_rewards_keep_the_task_reward_and_log_the_penalty():
    samples = [_sample(n, r) for n, r in ((10, 1.0), (17, 1.0), (18, 0.0), (20, 0.0))]
    rewards, metrics = shaped_rewards(samples, DAPO, [20] * 4)
    assert rewards.tolist() == [1.0, 0.75, -0.5, -1.0]
    assert metrics == {
        "reward/overlong_frac": 0.75,
        "reward/overlong_penalty_mean": (0 - 0.25 - 0.5 - 1.0) / 4,
        "reward/shaped_mean": (1.0 + 0.75 - 0.5 - 1.0) / 4,
    }
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0, 0.0]  # the task reward is left as it was
    off, none = shaped_rewards(samples, AlgorithmConfig(group_size=4), None)
    assert off.tolist() == [1.0, 1.0, 0.0, 0.0] and none == {}
    with pytest.raises(ValueError, match="budget"):
        shaped_rewards(samples, DAPO, None)


def test_advantages_of_a_group_with_one_sample_at_the_cap():
    # Group 0: all four correct, the last one cut off at the budget of 20 -> shaped [1, 1, 1, 0]:
    # mean 3/4, population std sqrt(3/16), so A = (1 - 3/4) / sqrt(3/16) = 1/sqrt(3) and -sqrt(3).
    # Group 1: one correct, all short -> unshaped [1, 0, 0, 0]: A = sqrt(3), -1/sqrt(3).
    lengths, task = [5, 8, 12, 20, 5, 6, 7, 8], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    samples = [_sample(n, r, group=i // 4) for i, (n, r) in enumerate(zip(lengths, task, strict=True))]
    batch, metrics = make_train_batch(samples, DAPO, get_advantage("group"), 0, [20] * 8)
    s3 = math.sqrt(3.0)
    assert batch is not None
    assert batch.advantages.tolist() == pytest.approx([1 / s3] * 3 + [-s3, s3] + [-1 / s3] * 3, rel=1e-5)
    assert metrics["advantage/zero_variance_frac"] == 0.0
    assert metrics["reward/overlong_frac"] == 1 / 8 and metrics["reward/overlong_penalty_mean"] == -1 / 8
    # Without the shaping (or under a budget of 40, whose window starts past 20 tokens) group 0 has no
    # signal and is dropped.
    for algo, budget in ((AlgorithmConfig(loss="dapo", group_size=4), 20), (DAPO, 40)):
        batch, metrics = make_train_batch(samples, algo, get_advantage("group"), 0, [budget] * 8)
        assert batch is not None and len(batch) == 4
        assert batch.advantages.tolist() == pytest.approx([s3] + [-1 / s3] * 3, rel=1e-5)
        assert metrics["advantage/zero_variance_frac"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"overlong_buffer": 1.0}, "algorithm.overlong_buffer"),
        ({"overlong_buffer": -0.1}, "algorithm.overlong_buffer"),
        ({"overlong_penalty": -1.0}, "algorithm.overlong_penalty"),
        ({"overlong_buffer": float("nan")}, "algorithm.overlong_buffer"),
    ],
)
def test_bad_overlong_settings_fail_with_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AlgorithmConfig(**kwargs)


def test_dapo_config_turns_the_shaping_on_and_overrides_fail_with_the_key():
    algo = to_train_config(composed("algorithm=dapo")).algorithm
    assert (algo.overlong_buffer, algo.overlong_penalty) == (0.2, 1.0)
    assert to_train_config(composed("algorithm=cispo")).algorithm.overlong_buffer == 0.0
    with pytest.raises(ValueError, match="algorithm.overlong_buffer"):
        to_train_config(composed("algorithm=dapo", "algorithm.overlong_buffer=1.5"))


# ------------------------------------------------------------------ the budget of a batch drawn ahead

TOK = load_tokenizer("builtin:char")


MODEL = tiny_lm("qwen2", 0, vocab_size=len(TOK), hidden_size=32, intermediate_size=64).eval()


def _stage(staleness: int) -> RolloutStage:
    cfg = TrainConfig(
        data=DataConfig(num_train=32, num_eval=0, prompts_per_step=2),
        rollout=RolloutConfig(
            backend="local", top_k=1, groups_per_task=1, max_batch_size=8, stop_on_eos=False
        ),
        reward=RewardConfig(isolation="thread"),
        algorithm=AlgorithmConfig(group_size=2, max_staleness=staleness, overlong_buffer=0.5),
    )
    manager = LocalRolloutManager("hf", {"model": MODEL, "max_batch_size": 8, "num_threads": 1})
    stream = PromptStream(load_split(cfg.data, "train"), TOK, cfg.data, cfg.algorithm.group_size)
    return RolloutStage(cfg, TOK, manager, build_scorers(cfg), stream, [])


class _Learner:
    """What sync_weights needs of a learner; the weights never change here (version 0 throughout)."""

    version = 0

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return MODEL.state_dict()


@pytest.mark.timeout(120)
def test_a_step_drawn_before_a_stage_change_keeps_its_budget_and_window():
    """max_staleness 1: step 2 is drawn at step 1 under the first stage's budget of 6; the stage changes
    to 4 before step 2 trains. Step 2's batch was generated under 6 and is shaped with 6's window; step 3,
    drawn after the change, under 4."""
    stage, learner = _stage(staleness=1), _Learner()
    try:
        stage.sync_weights(learner, 0, force=True)  # type: ignore[arg-type]
        stage.schedule(1, 6, 3)  # steps 1 and 2, budget 6
        samples, metrics = stage.collect(1, 0)
        assert stage.last_budget == 6 and metrics["rollout/budget"] == 6.0
        stage.sync_weights(learner, 1)  # type: ignore[arg-type]
        stage.schedule(2, 4, 3)  # the stage's budget is now 4: only step 3 is drawn under it
        samples, metrics = stage.collect(2, 0)
        assert stage.last_budget == 6 and metrics["rollout/budget"] == 6.0
        # No end of sequence: every response runs to the budget it was generated with, 6 tokens, which
        # is the cap (-1) under its own budget and past the cap (-1) under 4: look at 4 and 5 tokens.
        assert {len(s.response_ids) for s in samples} == {6}
        assert overlong_penalties([4, 5], [stage.last_budget] * 2, 0.5, 1.0).tolist() == [-1 / 3, -2 / 3]
        assert overlong_penalties([4, 5], [4, 4], 0.5, 1.0).tolist() == [-1.0, -1.0]
        stage.sync_weights(learner, 2)  # type: ignore[arg-type]
        stage.schedule(3, 4, 3)
        samples, metrics = stage.collect(3, 0)
        assert stage.last_budget == 4 and metrics["rollout/budget"] == 4.0
        assert {len(s.response_ids) for s in samples} == {4}
    finally:
        stage.close()
