"""The one rule for combining the metrics of the parts of a step.

Parts are micro-batches (on every learner rank) inside one optimizer step, then the K minibatches of one
rollout batch. Every key is combined the same way at both levels, by its name:

    *_max -> max of maxima      *_min -> min of minima      lr -> the last value
    everything else -> mean of means, weighted by the parts' weights (token shares for micro-batches,
    equal for minibatches)
"""

from __future__ import annotations

from collections.abc import Sequence

LAST_KEYS = frozenset({"lr"})


def combine_metrics(
    parts: Sequence[dict[str, float]], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Combines per-part metrics; a key missing from some parts is combined over the parts that have it."""
    weights = [1.0] * len(parts) if weights is None else list(weights)
    if len(weights) != len(parts):
        raise ValueError(f"{len(parts)} metric parts but {len(weights)} weights")
    out: dict[str, float] = {}
    total_weight: dict[str, float] = {}
    for part, weight in zip(parts, weights):
        for key, value in part.items():
            value = float(value)
            if key.endswith("_max"):
                out[key] = max(out.get(key, value), value)
            elif key.endswith("_min"):
                out[key] = min(out.get(key, value), value)
            elif key in LAST_KEYS:
                out[key] = value
            else:
                out[key] = out.get(key, 0.0) + weight * value
                total_weight[key] = total_weight.get(key, 0.0) + weight
    for key, weight in total_weight.items():
        out[key] = out[key] / weight if weight > 0 else float("nan")
    return out
