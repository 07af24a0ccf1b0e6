"""How long a rollout worker may take over a generate shard before it counts as stalled.

A fixed limit is wrong both ways: 1,800 s hides a frozen worker for half an hour on a run whose shards take
two seconds, and kills healthy workers on a run whose 80k-token budget takes longer than that. So, unless
the user fixes it (rollout.worker_timeout_s > 0), the limit follows the request: the worst case of the
shard, every sample running to the generation budget, at the slowest decode speed measured on recent
shards, times a safety factor, and never under a floor. Before anything has been measured (the first
shard also loads and warms the engine) the start-up limit applies.
"""

from __future__ import annotations

from collections import deque

AUTO = 0.0  # rollout.worker_timeout_s = 0: derived from the budget and the measured decode speed


class StallTimeout:
    def __init__(
        self,
        fixed_s: float = AUTO,
        initial_s: float = 1800.0,
        factor: float = 4.0,
        floor_s: float = 120.0,
        window: int = 16,
    ) -> None:
        if fixed_s < 0 or initial_s <= 0 or factor < 1 or floor_s <= 0 or window < 1:
            raise ValueError(
                "stall timeout: fixed_s >= 0 (0: auto), initial_s > 0, factor >= 1, floor_s > 0, window >= 1"
            )
        self.fixed_s, self.initial_s, self.factor, self.floor_s = fixed_s, initial_s, factor, floor_s
        self._rates: deque[float] = deque(maxlen=window)  # tokens per second of recent shards

    def observe(self, new_tokens: int, seconds: float) -> None:
        """A shard that finished: `new_tokens` generated in `seconds` from its submission."""
        if new_tokens > 0 and seconds > 0:
            self._rates.append(new_tokens / seconds)

    @property
    def rate(self) -> float | None:
        """The slowest recent decode speed (tokens/s), or None before any shard finished."""
        return min(self._rates) if self._rates else None

    def for_shard(self, samples: int, max_new_tokens: int) -> tuple[float, str]:
        """(seconds, how they were chosen) for a shard of `samples` samples with this budget."""
        if self.fixed_s:
            return self.fixed_s, f"rollout.worker_timeout_s={self.fixed_s:g} s"
        rate = self.rate
        if rate is None:
            return self.initial_s, (
                f"{self.initial_s:g} s (rollout.worker_timeout_s=0: no decode speed measured yet, so "
                "rollout.worker_start_timeout_s)"
            )
        expected = samples * max_new_tokens / rate
        seconds = max(self.floor_s, self.factor * expected)
        return seconds, (
            f"{seconds:g} s (rollout.worker_timeout_s=0: {self.factor:g} x {expected:.1f} s for {samples} "
            f"samples x {max_new_tokens} tokens at the measured {rate:.1f} tokens/s, at least "
            f"{self.floor_s:g} s)"
        )
