from __future__ import annotations

import time

import pytest

from rewards import (
    RewardError,
    RewardInput,
    RewardResult,
    RewardScorer,
    RewardSpec,
    RewardTimeout,
    reward_range,
)


def slow_on_marker(inp: RewardInput) -> float:
    if "SLOW" in inp.completion:
        time.sleep(5)
    return 1.0


def raises_on_marker(inp: RewardInput) -> RewardResult:
    if "BOOM" in inp.completion:
        raise KeyError("boom")
    return RewardResult(0.5, "half")


def always_slow(inp: RewardInput) -> float:
    time.sleep(60)
    return 1.0


def out_of_time_on_marker(inp: RewardInput) -> float:
    if "LONG" in inp.completion:
        raise RewardTimeout("used up its CPU budget")
    return 1.0


@reward_range(-1.0, 1.0)
def signed(inp: RewardInput) -> float:
    return -1.0 if "bad" in inp.completion else 1.0


def unsigned_penalty(inp: RewardInput) -> float:
    return -0.25


def _inputs(*completions: str) -> list[RewardInput]:
    return [RewardInput("q", c, reference="4") for c in completions]


def test_weighted_combination_in_order() -> None:
    scorer = RewardScorer([RewardSpec("math", 2.0), RewardSpec("format", 0.5, {"style": "boxed"})])
    out = scorer.score(_inputs("\\boxed{4}", "\\boxed{5}", "no answer", "#### 4"))
    assert [r.score for r in out] == [2.5, 0.5, 0.0, 2.0]
    assert "math: wrong answer" in out[1].reason and "format" in out[2].reason
    metrics = scorer.metrics()
    assert metrics["reward/math/mean"] == 0.5 and metrics["reward/samples"] == 4.0
    assert metrics["reward/errors"] == 0.0 and metrics["reward/timeouts"] == 0.0


def test_errors_become_zero_and_are_counted() -> None:
    scorer = RewardScorer([RewardSpec(f"{__name__}:raises_on_marker")])
    out = scorer.score(_inputs("ok", "BOOM", "ok"))
    assert [r.score for r in out] == [0.5, 0.0, 0.5]
    assert "error KeyError" in out[1].reason
    metrics = scorer.metrics()
    assert metrics["reward/errors"] == 1.0 and metrics["reward/raises_on_marker/errors"] == 1.0
    assert not [k for k in metrics if __name__ in k]  # metric keys use the plugin's short name
    assert scorer.metrics()["reward/errors"] == 0.0  # counts reset on each call


def test_timeout_gives_zero_without_losing_other_samples() -> None:
    scorer = RewardScorer([RewardSpec(f"{__name__}:slow_on_marker")], timeout_s=0.5, max_workers=2)
    before = set(scorer.worker_pids())
    out = scorer.score(_inputs("SLOW", "SLOW", "fast", "SLOW", "fast"))
    assert [r.score for r in out] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert "timeout" in out[0].reason
    # Stuck workers are killed and replaced, not waited for (no wall-clock assert: see issue #27).
    assert len(set(scorer.worker_pids()) - before) >= 2
    assert scorer.metrics()["reward/timeouts"] == 3.0
    assert [r.score for r in scorer.score(_inputs("fast"))] == [1.0]  # the pool still works


def test_strict_mode_names_reward_and_sample() -> None:
    scorer = RewardScorer([RewardSpec(f"{__name__}:raises_on_marker")], strict=True)
    with pytest.raises(RewardError, match=r"raises_on_marker' failed on sample 1"):
        scorer.score(_inputs("ok", "BOOM"))
    slow = RewardScorer([RewardSpec(f"{__name__}:slow_on_marker")], timeout_s=0.2, strict=True)
    with pytest.raises(RewardError, match="timed out after 0.2s on sample 0"):
        slow.score(_inputs("SLOW"))


def test_penalty_range_and_malformed_metadata() -> None:
    scorer = RewardScorer(
        [RewardSpec("math"), RewardSpec("overlong", 1.0, {"max_len": 100, "cache_len": 20})]
    )
    inputs = [
        RewardInput("q", "\\boxed{4}", "4", {"response_length": 50}),
        RewardInput("q", "\\boxed{4}", "4", {"response_length": 90}),
        RewardInput("q", "\\boxed{4}", "4", {}),
    ]
    out = scorer.score(inputs)
    assert [r.score for r in out] == [1.0, 0.5, 1.0]
    assert "response_length" in out[2].reason and scorer.metrics()["reward/overlong/errors"] == 1.0


def test_empty_specs_and_unknown_reward_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RewardScorer([])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardScorer([RewardSpec("nope")])


def test_a_plugin_that_fails_on_every_sample_stops_with_its_traceback_and_sample() -> None:
    scorer = RewardScorer([RewardSpec(f"{__name__}:raises_on_marker")])
    with pytest.raises(RewardError) as err:
        scorer.score(_inputs("BOOM 1", "BOOM 2"))
    message = str(err.value)
    assert "failed on 2 of 2 samples" in message and "completion 'BOOM 1'" in message
    assert "Traceback" in message and "raise KeyError" in message and "KeyError: 'boom'" in message
    assert isinstance(err.value.__cause__, KeyError)


def test_stop_error_fraction_is_the_threshold() -> None:
    default = RewardScorer([RewardSpec(f"{__name__}:raises_on_marker")])
    assert [r.score for r in default.score(_inputs("BOOM", "ok"))] == [0.0, 0.5]  # half failed: go on
    assert default.metrics()["reward/errors"] == 1.0
    strict_half = RewardScorer([RewardSpec(f"{__name__}:raises_on_marker")], stop_error_fraction=0.5)
    with pytest.raises(RewardError, match="failed on 1 of 2 samples"):
        strict_half.score(_inputs("BOOM", "ok"))
    assert [r.score for r in strict_half.score(_inputs("BOOM", "ok", "ok"))] == [0.0, 0.5, 0.5]


def test_max_workers_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        RewardScorer([RewardSpec("math")], max_workers=0)


def test_timeouts_count_toward_the_stop_rule() -> None:
    """A reward that always times out used to give zeros and exit 0 (issue #27): it stops the run now."""
    with RewardScorer([RewardSpec(f"{__name__}:always_slow")], timeout_s=0.3) as scorer:
        with pytest.raises(RewardError, match=r"always_slow' failed on 2 of 2 samples \(2 timed out") as err:
            scorer.score(_inputs("a", "b"))
    assert "timed out after 0.3s (reward.timeout_s)" in str(err.value)
    mixed = RewardScorer([RewardSpec(f"{__name__}:slow_on_marker")], timeout_s=0.3, stop_error_fraction=0.5)
    with mixed, pytest.raises(RewardError, match="failed on 1 of 2 samples"):
        mixed.score(_inputs("SLOW", "fast"))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_reward_reporting_its_own_timeout_is_counted_as_a_timeout(isolation: str) -> None:
    with RewardScorer([RewardSpec(f"{__name__}:out_of_time_on_marker")], isolation=isolation) as scorer:
        out = scorer.score(_inputs("LONG", "ok", "ok"))
        assert [r.score for r in out] == [0.0, 1.0, 1.0]
        assert out[0].reason == "out_of_time_on_marker: timeout (used up its CPU budget)"
        metrics = scorer.metrics()
        assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0
        assert metrics["reward/out_of_time_on_marker/timeouts"] == 1.0
    strict = RewardScorer([RewardSpec(f"{__name__}:out_of_time_on_marker")], strict=True, isolation=isolation)
    with strict, pytest.raises(RewardError, match=r"timed out \(used up its CPU budget\) on sample 0"):
        strict.score(_inputs("LONG"))


def test_penalties_in_a_declared_or_configured_range_score_in_the_workers() -> None:
    specs = [
        RewardSpec(f"{__name__}:signed"),
        RewardSpec(f"{__name__}:unsigned_penalty", 2.0, low=-1.0, high=0.0),
    ]
    with RewardScorer(specs) as scorer:
        out = scorer.score(_inputs("bad", "good"))
        assert [r.score for r in out] == [-1.5, 0.5]
        metrics = scorer.metrics()
        assert metrics["reward/signed/mean"] == 0.0 and metrics["reward/unsigned_penalty/mean"] == -0.25
    with RewardScorer([RewardSpec(f"{__name__}:unsigned_penalty")]) as undeclared:
        with pytest.raises(RewardError, match=r"unsigned_penalty' returned -0.25 outside \[0.0, 1.0\]"):
            undeclared.score(_inputs("a"))
