"""Evaluation sets (eval.sets): pass@k / mean@k by hand, the config's checks, loading a set from other
data, and a rollout stage evaluating two sets (greedy held-out + k samples at a temperature) without Ray.
"""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from cispo.api import compose
from cispo.core.config import DataConfig, RewardConfig, RewardItem, TrainConfig
from cispo.core.eval_config import EvalConfig, EvalSetConfig
from cispo.core.rollout_config import RolloutConfig
from cispo.core.testing import tiny_lm
from cispo.driver.build import build_scorers
from cispo.driver.data import eval_groups, load_split
from cispo.driver.eval_metrics import mean_at_k, metric_key, pass_at_k, set_metrics
from cispo.driver.eval_sets import build_eval_sets, load_eval_sets, set_keys
from cispo.driver.policy import load_tokenizer
from cispo.driver.rollout_stage import RolloutStage
from rewards.base import RewardInput
from rollout.manager import LocalRolloutManager

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------- metrics
def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5) = 21, C(10,5) = 252
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # one wrong sample: any 2 hold a correct one
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample():
    """The estimator equals enumeration: over every k-subset of the n samples, the share holding one."""
    for n in range(1, 7):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(correct, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_set_metrics_on_fixed_samples():
    counts = [(4, 1), (4, 0), (4, 4)]  # three prompts, 4 samples each: 1, 0 and 4 correct
    out = set_metrics(counts, ["pass@k", "mean@k", "pass@2", "pass@1"], samples=4)
    assert out == pytest.approx(
        {
            "accuracy": 5 / 12,
            "pass@4": (1 + 0 + 1) / 3,
            "mean@4": (0.25 + 0 + 1) / 3,
            "pass@2": (0.5 + 0 + 1) / 3,
            "pass@1": 5 / 12,
        }
    )
    assert mean_at_k([(2, 1), (4, 1)]) == pytest.approx(0.375)  # a mean over prompts, not samples
    assert set_metrics([(1, 1), (1, 0)], ["accuracy"], samples=1) == {"accuracy": 0.5}  # greedy
    assert set_metrics([], ["pass@k"], samples=4) == {}
    assert metric_key("pass@k", 8) == "pass@8" and metric_key("mean@k", 8) == "mean@8"
    assert set_keys("gsm", {"pass@4": 0.5}) == {"eval/gsm/pass@4": 0.5}


# --------------------------------------------------------------------------------------------- config
def test_default_is_one_greedy_held_out_set():
    cfg = compose([])
    assert cfg.eval == EvalConfig([EvalSetConfig(name="held_out")])
    (only,) = cfg.eval.sets
    assert (only.data, only.split, only.num, only.samples, only.temperature) == ({}, "eval", 0, 1, None)
    sampled = compose(["eval=sampled"]).eval.sets
    assert [(s.name, s.samples, s.temperature) for s in sampled] == [
        ("held_out", 1, None),
        ("held_out_t07", 4, 0.7),
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.sets=[{name: a}, {name: a}]", r"eval.sets: names must be unique"),
        ("eval.sets=[{name: a, data: {pth: x.jsonl}}]", r"eval.sets\[0\].data.pth: not a data field"),
        ("eval.sets=[{name: a, samples: 2, temperature: 1, metrics: [pass@3]}]", r"sets\[0\].metrics\[0\]"),
        ("eval.sets=[{name: a, metrics: [pass@x]}]", r"eval.sets\[0\].metrics\[0\]"),
        ("eval.sets=[{name: a, samples: 4, temperature: 0}]", r"eval.sets\[0\].samples"),
        ("eval.sets=[{name: a/b}]", r"eval.sets\[0\].name"),
        ("eval.sets=[{name: reward}]", r"eval.sets\[0\].name"),
        ("eval.sets=[{name: a, num: -1}]", r"eval.sets\[0\].num"),
        ("eval.sets=[]", r"eval.sets: needs at least one set"),
    ],
)
def test_bad_sets_are_config_errors_naming_the_key(override: str, message: str):
    with pytest.raises(ValueError, match=message):
        compose([override])


def test_unknown_set_key_is_refused():
    with pytest.raises(Exception, match="eval.sets"):
        compose(["eval.sets=[{name: a, sample: 4}]"])


def test_sampled_set_needs_a_temperature_when_eval_temperature_is_greedy():
    cfg = compose(["eval.sets=[{name: a, samples: 4}]"])  # temperature: rollout.eval_temperature = 0
    with pytest.raises(ValueError, match=r"eval.sets\[0\].temperature"):
        load_eval_sets(cfg)
    assert load_eval_sets(compose(["eval.sets=[{name: a, samples: 4}]", "rollout.eval_temperature=1"]))


# -------------------------------------------------------------------------------------------- loading
def test_sets_load_from_their_own_data():
    cfg = compose(
        [
            "data.num_eval=6",
            "eval.sets=[{name: held_out}, {name: three, data: {generator_kwargs: {digits: 3}}, num: 4}, "
            "{name: train_rows, split: train, num: 5}]",
        ]
    )
    held, three, train_rows = load_eval_sets(cfg)
    assert held.dataset is None  # the run's held-out split, which the stage already holds
    assert three.data.generator_kwargs == {"digits": 3} and cfg.data.generator_kwargs == {"digits": 2}
    assert len(three.dataset) == 4 and all(len(p.split("+")[0]) == 3 for p in three.dataset["prompt"])
    expected = load_split(DataConfig(generator_kwargs={"digits": 3}, num_eval=6), "eval")["prompt"][:4]
    assert three.dataset["prompt"] == expected
    assert train_rows.dataset["prompt"] == load_split(cfg.data, "train")["prompt"][:5]


def test_a_sets_bad_data_names_the_set():
    with pytest.raises(ValueError, match=r"^config error at eval.sets\[1\].data.path: needed for source"):
        load_eval_sets(compose(["eval.sets=[{name: a}, {name: b, data: {source: jsonl}}]"]))
    missing = "eval.sets=[{name: a}, {name: b, data: {source: jsonl, path: /nonexistent.jsonl}}]"
    with pytest.raises(ValueError, match=r"^config error at eval.sets\[1\].data.path: no file"):
        load_eval_sets(compose([missing]))


# --------------------------------------------------------------------------------- the rollout stage
TOK = load_tokenizer("builtin:char")
MODEL = tiny_lm("qwen2", 3, vocab_size=len(TOK), hidden_size=32, intermediate_size=64).eval()


def odd_length(inp: RewardInput) -> float:
    """Full reward for about half of a random model's answers: something for pass@k to count."""
    return float(len(inp.completion) % 2 == 1)


def _stage(sets: list[EvalSetConfig]) -> tuple[RolloutStage, TrainConfig]:
    torch.manual_seed(0)
    cfg = TrainConfig(
        data=DataConfig(num_train=8, num_eval=5),
        rollout=RolloutConfig(backend="local", max_batch_size=8, eval_temperature=0.0),
        reward=RewardConfig(rewards=[RewardItem(name=f"{__name__}:odd_length")], isolation="thread"),
        eval=EvalConfig(sets),
    )
    manager = LocalRolloutManager("hf", {"model": MODEL, "max_batch_size": 8, "num_threads": 1})
    held_out = eval_groups(load_split(cfg.data, "eval"), TOK, cfg.data)
    stage = RolloutStage(cfg, TOK, manager, build_scorers(cfg), None, held_out)
    stage.eval_sets = build_eval_sets(load_eval_sets(cfg), TOK, held_out, None)
    return stage, cfg


def _reference(samples, n: int, k: int) -> tuple[float, float]:
    """pass@k and mean@n straight from the binomials, per prompt in order (groups of n samples)."""
    groups = [samples[i : i + n] for i in range(0, len(samples), n)]
    counts = [(len(g), sum(s.reward == 1.0 for s in g)) for g in groups]
    pass_k = sum(1 - math.comb(m - c, k) / math.comb(m, k) for m, c in counts) / len(counts)
    return pass_k, sum(c / m for m, c in counts) / len(counts)


def test_stage_evaluates_two_sets_each_with_its_own_sampling():
    sampled = EvalSetConfig(
        name="sampled", samples=4, temperature=1.0, metrics=["pass@k", "mean@k", "pass@2"], num=3
    )
    stage, _ = _stage([EvalSetConfig(name="held_out"), sampled])
    try:
        alone = stage.evaluate(budget=6, step=2)  # the first set alone: the held-out evaluation
        held, other = stage.evaluate_sets(budget=6, step=2)
    finally:
        stage.close()
    # The first set is today's held-out evaluation: same prompts, same greedy answers, same accuracy.
    assert [s.response_ids for s in held.samples] == [s.response_ids for s in alone.samples]
    assert held.accuracy == alone.accuracy == held.set_metrics["accuracy"]
    assert len(held.samples) == 5 and held.metrics["eval/reward/samples"] == 5
    # The sampled set: 3 prompts x 4 samples, drawn at temperature 1 (not four copies of one answer).
    assert len(other.samples) == 12 and other.metrics["eval/sampled/reward/samples"] == 12
    assert len({s.prompt_text for s in other.samples}) == 3
    assert len({tuple(s.response_ids) for s in other.samples}) > 3
    (pass_4, mean_4), (pass_2, _) = _reference(other.samples, 4, 4), _reference(other.samples, 4, 2)
    correct = sum(s.reward == 1.0 for s in other.samples)
    assert other.set_metrics == pytest.approx(
        {"accuracy": correct / 12, "pass@4": pass_4, "mean@4": mean_4, "pass@2": pass_2}
    )
    assert 0 < correct < 12  # the reward splits the samples: the numbers above are not all 0 or 1
    assert other.set_metrics["pass@4"] >= other.set_metrics["pass@2"] >= other.set_metrics["mean@4"]
