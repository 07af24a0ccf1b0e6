"""Batch rewards: a reward that scores a whole batch in one call (the generative judge sends it to its
model at once, instead of one request per sample).

A reward object registered under a name may offer ``score_batch(inputs, **kwargs)`` beside its per-sample
``__call__(inp, **kwargs)`` (same keyword arguments). The scorer then calls ``score_batch`` once per
``score()`` in its own process, not through its worker pool: such a reward bounds its own time (the judge's
per-request timeouts and retries) and must not hang. Each slot of the returned list is the sample's
RewardResult or the exception that failed it; a ``TimeoutError`` (or ``RewardTimeout``) is counted as a
timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from cispo.core.registry import callable_from
from rewards.base import RewardError, RewardInput, RewardResult, RewardTimeout, to_result
from rewards.registry import REWARDS, LoadedReward
from rewards.workers import Task


@runtime_checkable
class BatchReward(Protocol):
    def score_batch(self, inputs: Sequence[RewardInput], **kwargs: Any) -> list[RewardResult | Exception]: ...


def batch_reward(name: str) -> BatchReward | None:
    """The reward registered (or found by path) as ``name`` when it scores batches, else None."""
    obj = callable_from(REWARDS, name)
    return obj if isinstance(obj, BatchReward) else None


def run_batch(reward: BatchReward, tasks: list[Task], loaded: LoadedReward, kwargs: dict[str, Any]) -> None:
    """Scores ``tasks`` (all for this reward) with one ``score_batch`` call; fills each task's outcome."""
    if not tasks:
        return
    try:
        results = reward.score_batch([t.inp for t in tasks], **kwargs)
        if len(results) != len(tasks):
            raise RewardError(
                f"reward {loaded.name!r}: score_batch returned {len(results)} results for {len(tasks)} inputs"
            )
    except Exception as e:  # noqa: BLE001 - a failed batch fails each of its samples, counted as errors
        for t in tasks:
            t.fail(e)
        return
    for t, result in zip(tasks, results):
        if isinstance(result, TimeoutError) and not isinstance(result, RewardTimeout):
            result = RewardTimeout(f"reward {loaded.name!r}: {result}")  # the scorer counts these as timeouts
        if isinstance(result, Exception):
            t.fail(result)
            continue
        try:
            t.result, t.done = to_result(result, loaded.name, loaded.low, loaded.high), True
        except RewardError as e:
            t.fail(e)
