"""The math reward's time limit is CPU time (issue #27): a busy machine scores as an idle one, and a check
past its budget reports a timeout (counted in reward/timeouts), never a silent 0 for a right answer."""

from __future__ import annotations

import signal
import time

import math_verify.parser as mv_parser
import pytest

import rewards.math as rmath
from rewards import RewardInput, RewardScorer, RewardSpec, RewardTimeout

RIGHT = ("so the answer is \\boxed{\\frac{1}{2}}", "0.5")  # not equal as text: math-verify has to work


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def spinning_math(inp: RewardInput) -> float:
    """In a reward worker: every math-verify parse burns 0.3 s of CPU; the budget is 0.1 s."""
    real = mv_parser.extract_target_from_pred
    if not getattr(real, "spins", False):

        def spin_then_parse(*args: object, **kwargs: object) -> object:
            _spin(0.3)
            return real(*args, **kwargs)

        spin_then_parse.spins = True  # type: ignore[attr-defined]
        mv_parser.extract_target_from_pred = spin_then_parse
    rmath.CPU_LIMIT_S = 0.1
    return rmath.score(inp.completion, str(inp.reference))


def test_time_off_the_cpu_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wall time that passes while the process waits (what load does to it) leaves the score alone; the
    old wall-clock SIGALRM turned such a parse into "could not be parsed", 0 for a right answer."""
    assert rmath.check(*RIGHT).score == 1.0  # warm: grammars built, caches filled
    real = mv_parser.extract_target_from_pred

    def waits_then_parses(*args: object, **kwargs: object) -> object:
        time.sleep(0.6)  # off the CPU
        return real(*args, **kwargs)

    monkeypatch.setattr(mv_parser, "extract_target_from_pred", waits_then_parses)
    monkeypatch.setattr(rmath, "CPU_LIMIT_S", 1.0)
    wall = time.monotonic()
    assert rmath.check(*RIGHT).score == 1.0
    assert time.monotonic() - wall > rmath.CPU_LIMIT_S  # the wall clock did pass the budget


def test_a_check_past_its_cpu_budget_raises_reward_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    real = mv_parser.extract_target_from_pred
    previous_handler = signal.getsignal(signal.SIGPROF)

    def spins_then_parses(*args: object, **kwargs: object) -> object:
        _spin(0.5)  # bounded: if no alarm came, the check would end and score 1.0, failing the test
        return real(*args, **kwargs)

    monkeypatch.setattr(mv_parser, "extract_target_from_pred", spins_then_parses)
    monkeypatch.setattr(rmath, "CPU_LIMIT_S", 0.2)
    with pytest.raises(RewardTimeout, match="more than 0.2 s of CPU time"):
        rmath.check(*RIGHT)
    with pytest.raises(RewardTimeout):
        rmath.score(*RIGHT)  # the public float API reports it too, rather than 0.0
    # the alarm is off and the previous handler back
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) == previous_handler


def test_a_math_timeout_in_a_reward_worker_is_counted_as_a_timeout() -> None:
    specs = [RewardSpec(f"{__name__}:spinning_math")]
    # stop_error_fraction above 1: never stop, this test reads the counts of a call that all timed out
    with RewardScorer(specs, timeout_s=60.0, max_workers=1, stop_error_fraction=2.0) as scorer:
        out = scorer.score([RewardInput("q", RIGHT[0], RIGHT[1])])
        assert out[0].score == 0.0
        assert (
            out[0].reason
            == "spinning_math: timeout (math: checking the answer took more than 0.1 s of CPU time)"
        )
        metrics = scorer.metrics()
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0
