"""Evaluation metrics over k samples per prompt: pure functions of (samples n, correct c) per prompt.

accuracy: the fraction of all samples that are correct (one greedy sample per prompt: the held-out
accuracy; k samples: the same number as mean@k). mean@k: the mean over prompts of c / n. pass@k: the
unbiased estimator of Chen et al. 2021 (the Codex paper), 1 - C(n - c, k) / C(n, k) per prompt, averaged:
the probability that at least one of k samples drawn without replacement from the n is correct.

A metric name is `accuracy`, `mean@k`, `pass@k` (k: the set's samples per prompt) or `pass@<j>` for a
j <= samples; METRICS maps each family to its function, so a new one is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cispo.core.eval_config import EVAL_METRIC

Counts = Sequence[tuple[int, int]]  # (samples n, correct c) for each prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) for one prompt with n samples of which c are correct (n >= k >= 1).
    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i): no large binomials."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:  # every draw of k holds a correct one
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Counts, k: int) -> float:
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def mean_at_k(counts: Counts) -> float:
    """The mean over prompts of each one's fraction of correct samples."""
    return sum(c / n for n, c in counts) / len(counts)


def accuracy(counts: Counts) -> float:
    """Correct samples over all samples."""
    return sum(c for _, c in counts) / sum(n for n, _ in counts)


# family (the name before "@") -> its value over the prompts' counts, with k
METRICS: dict[str, Callable[[Counts, int], float]] = {
    "accuracy": lambda counts, k: accuracy(counts),
    "mean": lambda counts, k: mean_at_k(counts),
    "pass": mean_pass_at_k,
}


def metric_k(name: str, samples: int) -> int:
    """The k a metric name uses with `samples` per prompt; ValueError for a name that is no metric or
    asks for more samples than there are."""
    match = EVAL_METRIC.match(name)
    if match is None:
        raise ValueError(f"unknown metric {name!r}: one of accuracy, mean@k, pass@k, pass@<j>")
    k = int(match.group(2)) if match.group(2) else samples
    if k > samples:
        raise ValueError(f"{name} needs at least {k} samples per prompt, the set draws {samples}")
    return k


def metric_key(name: str, samples: int) -> str:
    """The logged name: accuracy, mean@4, pass@4, pass@2 (k written out)."""
    if name == "accuracy":
        return name
    return f"{name.partition('@')[0]}@{metric_k(name, samples)}"


def set_metrics(counts: Counts, names: Sequence[str], samples: int) -> dict[str, float]:
    """Each named metric over the prompts' (n, c), keyed by metric_key; `accuracy` always included (the
    set's headline number, and the held-out accuracy of the first set)."""
    if not counts:
        return {}
    out = {"accuracy": accuracy(counts)}
    for name in names:
        k = metric_k(name, samples)
        if min(n for n, _ in counts) < k:
            raise ValueError(f"{name}: a prompt has fewer than {k} samples")
        out[metric_key(name, samples)] = METRICS[name.partition("@")[0]](counts, k)
    return out
