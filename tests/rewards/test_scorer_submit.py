"""RewardScorer.submit / result: scoring runs while the caller goes on, results and counters are exactly
score()'s, and metrics() right after result(h) holds that call's counters and no other's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rewards import RewardError, RewardInput, RewardScorer, RewardSpec
from rewards.scorer import Scorer

GATE_WAIT_S = 60.0  # a hang guard only: the test opens the gate at once


def gated(inp: RewardInput) -> float:
    """Waits for the gate file (opened by the test after submit returned), then scores exact match."""
    gate = inp.metadata.get("gate")
    end = time.monotonic() + GATE_WAIT_S
    while gate and not Path(gate).exists():
        if time.monotonic() > end:
            raise TimeoutError("the gate never opened: submit() did not return before scoring")
        time.sleep(0.01)
    if "BOOM" in inp.completion:
        raise KeyError("boom")
    return 1.0 if inp.completion == inp.reference else 0.0


def _inputs(gate: Path | None, *completions: str) -> list[RewardInput]:
    meta = {"gate": str(gate)} if gate else {}
    return [RewardInput("q", c, reference="4", metadata=dict(meta)) for c in completions]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_submit_overlaps_the_caller_and_counters_follow_each_result(tmp_path: Path, isolation: str) -> None:
    gate = tmp_path / "gate"
    spec = RewardSpec(f"{__name__}:gated")
    with RewardScorer([spec], timeout_s=2 * GATE_WAIT_S, max_workers=1, isolation=isolation) as scorer:
        first = scorer.submit(_inputs(gate, "4", "5", "4"))  # blocks in the reward until the gate opens
        second = scorer.submit(_inputs(gate, "BOOM", "4"))
        gate.touch()
        # taken out of order: each result brings its own counters, whatever ran in between
        assert [r.score for r in scorer.result(second)] == [0.0, 1.0]
        after_second = scorer.metrics()
        assert [r.score for r in scorer.result(first)] == [1.0, 0.0, 1.0]
        after_first = scorer.metrics()
        assert after_second["reward/samples"] == 2.0 and after_second["reward/errors"] == 1.0
        assert after_second["reward/gated/mean"] == 0.5 and after_second["reward/gated/errors"] == 1.0
        assert after_first == {"reward/samples": 3.0, "reward/gated/mean": 2 / 3, "reward/errors": 0.0,
                               "reward/timeouts": 0.0}  # fmt: skip
        # the same as score() gives, result by result
        assert scorer.score(_inputs(None, "BOOM", "4")) == scorer.result(
            scorer.submit(_inputs(None, "BOOM", "4"))
        )
        assert scorer.metrics()["reward/samples"] == 4.0
        with pytest.raises(ValueError, match="already taken"):
            scorer.result(first)
        with RewardScorer([spec], isolation="thread") as other, pytest.raises(ValueError, match="another"):
            other.result(scorer.submit(_inputs(None, "4")))
    with pytest.raises(RuntimeError, match="after close"):
        scorer.submit(_inputs(None, "4"))


def test_a_failing_call_raises_from_result_and_counts_nothing() -> None:
    scorer: Scorer = RewardScorer([RewardSpec(f"{__name__}:gated")], isolation="thread")
    try:
        handle = scorer.submit(_inputs(None, "BOOM", "BOOM"))  # every sample fails: stop_error_fraction=1
        with pytest.raises(RewardError, match=r"failed on 2 of 2 samples"):
            scorer.result(handle)
        assert scorer.metrics() == {"reward/errors": 0.0, "reward/timeouts": 0.0}
        assert [r.score for r in scorer.result(scorer.submit(_inputs(None, "4")))] == [1.0]
    finally:
        scorer.close()
