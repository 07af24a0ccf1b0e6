"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a penalty in [-1, 0] added to the reward.

With ``L_max = max_len`` and ``L_cache = cache_len``:
0 when ``len <= L_max - L_cache``; ``((L_max - L_cache) - len) / L_cache`` inside the last ``L_cache``
tokens; -1 beyond ``L_max``.
"""

from __future__ import annotations

from rewards.base import RewardInput, RewardResult

# The trainer puts the response's token count here; characters are not tokens, so there is no fallback.
LENGTH_KEY = "response_length"


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    soft_start = max_len - cache_len
    if length <= soft_start:
        return 0.0
    if length <= max_len:
        return (soft_start - length) / cache_len
    return -1.0


def overlong_reward(inp: RewardInput, *, max_len: int, cache_len: int) -> RewardResult:
    length = inp.metadata.get(LENGTH_KEY) if isinstance(inp.metadata, dict) else None
    if not isinstance(length, int):
        raise ValueError(f"overlong reward: metadata[{LENGTH_KEY!r}] must hold the response's token count")
    penalty = overlong_penalty(length, max_len, cache_len)
    return RewardResult(penalty, f"overlong: {length} tokens" if penalty < 0 else "")
