"""Scoring as groups finish: per-group reward counters combine into a step's exactly as one call over the
step would have given them, and a scored sample survives a checkpoint as plain data."""

from __future__ import annotations

import io

import pytest
import torch

from cispo.core.types import PromptGroup, Sample
from cispo.driver.scoring import ScoringThread, combine_group_metrics, restore_sample, sample_state
from rewards.base import RewardInput, RewardResult


def test_group_counters_combine_into_the_step_counters_by_hand() -> None:
    # Two jobs: 3 samples with mean 1/3 and one error, then 1 sample with mean 1.0 and one timeout.
    parts = [
        {"reward/samples": 3.0, "reward/errors": 1.0, "reward/exact_match/mean": 1 / 3},
        {"reward/samples": 1.0, "reward/timeouts": 1.0, "reward/exact_match/mean": 1.0},
        {},  # the other groups of a job carry no counters: the job's first group holds them all
    ]
    out = combine_group_metrics(parts)
    assert out["reward/samples"] == 4.0
    assert out["reward/errors"] == 1.0 and out["reward/timeouts"] == 1.0
    assert out["reward/exact_match/mean"] == pytest.approx((1 / 3 * 3 + 1.0 * 1) / 4)  # 0.5: per sample


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class _CountingScorer:
    """Scores 1 when the completion is 'b'; counts per call, as RewardScorer does."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._n = 0
        self._sum = 0.0

    def score(self, inputs: list[RewardInput]) -> list[RewardResult]:
        self.calls.append(len(inputs))
        results = [RewardResult(float(i.completion == "b")) for i in inputs]
        self._n += len(inputs)
        self._sum += sum(r.score for r in results)
        return results

    def metrics(self) -> dict[str, float]:
        out = {"reward/samples": float(self._n), "reward/x/mean": self._sum / self._n if self._n else 0.0}
        self._n, self._sum = 0, 0.0
        return out

    def close(self) -> None:
        return None


def _sample(index: int, response: list[int]) -> Sample:
    return Sample(index, [5, 6], response, [-0.5] * len(response), "eos", 3, prompt_text="p")


def test_a_job_is_scored_in_one_call_and_split_back_into_its_groups() -> None:
    scoring, scorer = ScoringThread(_Tok()), _CountingScorer()
    try:
        groups = [[_sample(7, [1]), _sample(7, [2])], [_sample(8, [1]), _sample(8, [1])]]
        scoring.put([("train", 1, 0, 7), ("train", 1, 0, 8)], groups, scorer)
        first, second = scoring.take([("train", 1, 0, 7), ("train", 1, 0, 8)])
    finally:
        scoring.close()
    assert scorer.calls == [4]  # one reward call for the whole job
    assert [s.reward for s in first.samples] == [1.0, 0.0] and [s.reward for s in second.samples] == [
        1.0,
        1.0,
    ]
    assert first.samples[0].response_text == "b"
    assert first.metrics == {"reward/samples": 4.0, "reward/x/mean": 0.75} and second.metrics == {}


def test_a_scored_sample_round_trips_through_a_weights_only_checkpoint() -> None:
    group = PromptGroup(index=11, prompt_ids=[3, 4], prompt_text="2+2=", reference="4", metadata={"k": 1})
    sample = Sample(
        11, [3, 4], [9, 8, 7], [-0.25, -1.5, -3.0000001192092896], "length", 2,
        prompt_text="2+2=", response_text="x", reference="4", metadata={"k": 1}, reward=0.5,
        reward_reason="half", token_versions=[2, 2, 3],
    )  # fmt: skip
    buffer = io.BytesIO()
    torch.save({"s": sample_state(sample)}, buffer)
    buffer.seek(0)
    back = restore_sample(group, torch.load(buffer, weights_only=True)["s"])
    assert back == sample
    assert (
        back.behaviour_logprobs == sample.behaviour_logprobs
    )  # bit for bit: float64 holds a float32's value
