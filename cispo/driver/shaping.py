"""DAPO's overlong reward shaping (Yu et al. 2025, eq. 13), its window tied to the budget each sample was
generated with.

L_max is the generation budget of the sample's own rollout (rollout.max_new_tokens, or the curriculum
stage's budget when its step was scheduled) and L_cache = algorithm.overlong_buffer * L_max (DAPO: 4096 of
20480, 0.2). The penalty, scaled by algorithm.overlong_penalty, is the curve of rewards.length (shared with
the `overlong` reward plugin): 0 up to L_max - L_cache tokens, then linear down to -1 at L_max. Generation
stops at L_max, so the "-1 beyond L_max" branch of eq. 13 is never reached; a response of exactly L_max
tokens (cut off by the budget, or ending with its last allowed token) gets the full -1 from the linear
branch, as in DAPO, whose L_max is the generation cap. With steps drawn ahead (algorithm.max_staleness > 0)
a batch trained after a curriculum stage change was generated under the previous stage's budget: its
window is that budget's, not the new stage's (RolloutStage records the budget of each step's plan).

The task reward stays what it is (reward/mean, the tables, dynamic sampling's filter, as DAPO filters on
accuracy); only the advantages see the shaped reward, logged as reward/shaped_mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cispo.core.config import AlgorithmConfig
from cispo.core.types import Sample
from rewards.length import overlong_penalty


def cache_tokens(budget: int, buffer: float) -> int:
    """L_cache for a budget: round(buffer * budget), at least one token (a tiny budget keeps a window of
    its last token rather than none) and at most the budget (buffer < 1)."""
    if budget < 1:
        raise ValueError(f"overlong shaping: the generation budget must be >= 1 token, got {budget}")
    if not 0.0 < buffer < 1.0:
        raise ValueError(f"overlong shaping: algorithm.overlong_buffer must be in (0, 1), got {buffer}")
    return min(budget, max(1, round(buffer * budget)))


def overlong_penalties(
    lengths: Sequence[int], budgets: Sequence[int], buffer: float, scale: float
) -> torch.Tensor:
    """Per sample, scale * eq. 13 with L_max = its budget and L_cache = cache_tokens(budget, buffer):
    values in [-scale, 0], float64. buffer 0: all zeros (shaping off)."""
    if len(lengths) != len(budgets):
        raise ValueError(f"overlong shaping: {len(lengths)} lengths but {len(budgets)} budgets")
    if buffer == 0.0:
        return torch.zeros(len(lengths), dtype=torch.float64)
    values = [
        scale * overlong_penalty(n, budget, cache_tokens(budget, buffer))
        for n, budget in zip(lengths, budgets, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64)


def shaped_rewards(
    samples: Sequence[Sample], algo: AlgorithmConfig, budgets: Sequence[int] | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The rewards the advantages are computed from: each sample's task reward plus its overlong penalty
    (algorithm.overlong_buffer > 0), and the metrics of the shaping (none when it is off).

    reward/overlong_frac: the share of samples penalised (penalty < 0); reward/overlong_penalty_mean: the
    mean penalty over all samples (<= 0, scaled); reward/shaped_mean: the mean shaped reward (reward/mean
    stays the task reward, so accuracy curves compare across algorithms)."""
    task = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    if algo.overlong_buffer == 0.0:
        return task.to(torch.float32), {}
    if budgets is None:
        raise ValueError("overlong shaping needs the generation budget of every sample (budgets=None)")
    lengths = [len(s.response_ids) for s in samples]
    penalties = overlong_penalties(lengths, budgets, algo.overlong_buffer, algo.overlong_penalty)
    shaped = task + penalties
    n = max(1, len(samples))
    metrics = {
        "reward/overlong_frac": float((penalties < 0).sum().item()) / n,
        "reward/overlong_penalty_mean": float(penalties.sum().item()) / n,
        "reward/shaped_mean": float(shaped.sum().item()) / n,
    }
    return shaped.to(torch.float32), metrics
