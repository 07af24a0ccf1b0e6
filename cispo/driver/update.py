"""The learning half of a step: scored samples -> group advantages -> TrainBatch -> K off-policy minibatch
updates on the learner, their metrics combined by the one rule in cispo.core.metrics.

Metric names: what the loss function reports (clip fractions, IS-weight statistics, approx. KL) and the
loss value go under the loss's own name, `cispo/...`, `grpo/...`, `dapo/...` (a loss given by a
`pkg.module:fn` path logs under `actor/`); what belongs to the optimizer and the policy rather than to the
algorithm (`actor/grad_norm`, `actor/lr`, `actor/router_aux_loss`) under `actor/`; `entropy` and
`train_infer/*` stay unprefixed.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cispo.algo.advantages import AdvantageFn
from cispo.algo.losses import get_policy_loss
from cispo.core.config import AlgorithmConfig
from cispo.core.metrics import combine_metrics
from cispo.core.types import Sample, TrainBatch
from cispo.driver.batch import build_train_batch, split_minibatches
from cispo.driver.shaping import shaped_rewards
from cispo.learner import Learner

ACTOR_KEYS = ("grad_norm", "lr", "router_aux_loss", "skipped_frac")


class RunStopped(RuntimeError):
    """The run stopped itself on purpose; the message says why and what to change (the CLI prints it as
    one line, without a traceback)."""


class NonFiniteUpdates(RunStopped):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class ZeroVarianceStop(RunStopped):
    """Too many steps in a row had no group with reward variance: nothing was being learned."""


ZERO_VARIANCE_ACTIONS = ("stop", "warn")


class ZeroVarianceGuard:
    """Counts consecutive steps where every group's rewards were all equal (zero advantage everywhere, so
    no gradient); after `limit` in a row it stops the run or warns (`action`), naming the likely causes.
    A limit of 0 switches it off."""

    def __init__(self, limit: int, action: str = "stop") -> None:
        if action not in ZERO_VARIANCE_ACTIONS:
            raise ValueError(f"zero-variance action must be one of {ZERO_VARIANCE_ACTIONS}, got {action!r}")
        self.limit, self.action, self.in_a_row = limit, action, 0
        self.rewards: list[float] = []

    def observe(self, zero_variance_frac: float, reward_mean: float, warn: Callable[[str], None]) -> None:
        if zero_variance_frac < 1.0:
            self.in_a_row, self.rewards = 0, []
            return
        self.in_a_row += 1
        self.rewards.append(reward_mean)
        if not self.limit or self.in_a_row % self.limit:
            return
        message = self.explain()
        if self.action == "stop":
            raise ZeroVarianceStop(message)
        warn(f"warning: {message}")

    def explain(self) -> str:
        low, high = min(self.rewards), max(self.rewards)
        return (
            f"{self.in_a_row} steps in a row had zero reward variance in every group (each group's samples "
            f"all got the same reward, so every advantage was 0 and nothing was learned; mean reward "
            f"{low:g}..{high:g}) (algorithm.max_zero_variance_steps={self.limit}). Likely causes: a reward "
            "that is always 0 (the task is too hard for the policy, answers are cut off by the generation "
            "budget, or their format is not what the reward parses), always the full reward (the task is "
            "too easy), or a reward plugin that fails on every sample (see reward/errors). Set "
            "algorithm.zero_variance_action=warn to go on anyway."
        )


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) updates across steps; raises after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def observe(self, metrics: dict[str, float]) -> None:
        if metrics.get("skipped_frac", 0.0) > 0:
            self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        else:
            self.in_a_row = 0
        if self.in_a_row >= self.limit:
            raise NonFiniteUpdates(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(learner.max_nonfinite_steps={self.limit}); they were skipped, nothing non-finite was "
                "checkpointed. Lower learner.lr or check the reward and advantages."
            )


RATIO_KEYS = ("ratio/p50", "ratio/p90", "ratio/p99", "ratio/max", "ratio/abs_log_first", "ratio/abs_log_last")
RATIO_CAP_KEYS = ("ratio/cap_frac_high", "ratio/cap_frac_low")


def _hyper(loss_name: str, loss_kwargs: Mapping[str, Any], name: str) -> float:
    """A clip parameter as the loss will see it: given in loss_kwargs, else the loss function's default
    (read from its signature, so the two cannot drift apart)."""
    if name in loss_kwargs:
        return float(loss_kwargs[name])
    return float(inspect.signature(get_policy_loss(loss_name)).parameters[name].default)


def _asymmetric_bounds(loss_name: str, loss_kwargs: Mapping[str, Any]) -> tuple[float, float]:
    return (1.0 - _hyper(loss_name, loss_kwargs, "eps_low"), 1.0 + _hyper(loss_name, loss_kwargs, "eps_high"))


def _symmetric_bounds(loss_name: str, loss_kwargs: Mapping[str, Any]) -> tuple[float, float]:
    eps = _hyper(loss_name, loss_kwargs, "eps")
    return 1.0 - eps, 1.0 + eps


# Per loss name: the interval [lo, hi] its IS weight (CISPO) or ratio (the clipped surrogates) is held to,
# after the offset convention (1 - eps_low, 1 + eps_high): CISPO's default [0, 5], DAPO's [0.8, 1.28].
RATIO_BOUNDS: dict[str, Callable[[str, Mapping[str, Any]], tuple[float, float]]] = {
    "cispo": _asymmetric_bounds,
    "dapo": _asymmetric_bounds,
    "grpo": _symmetric_bounds,
}


def ratio_bounds(loss_name: str, loss_kwargs: Mapping[str, Any]) -> tuple[float, float] | None:
    """[lo, hi] of the loss's weight or ratio; None for a loss without known bounds (a dotted path)."""
    bounds = RATIO_BOUNDS.get(loss_name)
    return bounds(loss_name, loss_kwargs) if bounds else None


def ratio_metrics(log_ratios: list[torch.Tensor], bounds: tuple[float, float] | None) -> dict[str, float]:
    """How far the K updates moved the policy from the behaviour policy, over every trained token of the
    step. log_ratios: per minibatch in update order, log r = logp - old_logp of its response tokens, with
    logp taken before that minibatch's update (so the last one has seen K - 1 updates).

    ratio/p50, p90, p99, max: quantiles of r over all minibatches; ratio/cap_frac_high, cap_frac_low: the
    fraction of tokens with r > hi and r < lo (the loss's own test; only for a loss with known bounds);
    ratio/abs_log_first, abs_log_last: mean |log r| in the first minibatch (before any update: only the
    train/inference mismatch) and the last (the drift by the K-th update)."""
    log_r = torch.cat(log_ratios)
    if log_r.numel() == 0:
        return {}
    ratio = log_r.exp()
    # numpy's quantile (linear interpolation, like torch's) has no size limit; torch.quantile stops at 2^24
    # elements, fewer tokens than one step of a large run.
    p50, p90, p99 = (float(q) for q in np.quantile(ratio.cpu().numpy(), [0.5, 0.9, 0.99]))
    out = {"ratio/p50": p50, "ratio/p90": p90, "ratio/p99": p99, "ratio/max": ratio.max().item()}
    for key, part in (("ratio/abs_log_first", log_ratios[0]), ("ratio/abs_log_last", log_ratios[-1])):
        out[key] = part.abs().mean(dtype=torch.float64).item() if part.numel() else float("nan")
    if bounds is not None:
        low, high = bounds
        out["ratio/cap_frac_high"] = (ratio > high).sum().item() / ratio.numel()
        out["ratio/cap_frac_low"] = (ratio < low).sum().item() / ratio.numel()
    return out


def loss_prefix(loss_name: str) -> str:
    """`cispo`, `grpo`, `dapo` (or any registered name); `actor` for a loss given by dotted path."""
    return loss_name if loss_name.isidentifier() else "actor"


def train_keys(loss_name: str) -> tuple[str, ...]:
    """Keys every step row carries, logged as null when no group had signal (so nothing was trained)."""
    prefix = loss_prefix(loss_name)
    return (
        f"{prefix}/loss",
        f"{prefix}/clip_frac",
        f"{prefix}/is_weight_mean",
        "actor/grad_norm",
        "entropy",
        "train_infer/logprob_corr",
        "time/train_s",
        "time/weight_sync_s",
        *RATIO_KEYS,
        *(RATIO_CAP_KEYS if loss_name in RATIO_BOUNDS else ()),
    )


def make_train_batch(
    samples: list[Sample],
    algo: AlgorithmConfig,
    advantage_fn: AdvantageFn,
    pad_token_id: int,
    budgets: Sequence[int] | None = None,
) -> tuple[TrainBatch | None, dict[str, float]]:
    """Group advantages of the shaped rewards (the task reward plus DAPO's overlong penalty, whose window
    is each sample's generation budget, `budgets`: cispo.driver.shaping); zero-variance groups carry no
    signal and are dropped when configured."""
    rewards, metrics = shaped_rewards(samples, algo, budgets)
    advantages = advantage_fn(rewards, algo.group_size, **algo.advantage_kwargs)
    keep = (
        advantages.keep_rows(algo.group_size)
        if algo.filter_zero_variance
        else torch.ones(len(samples), dtype=torch.bool)
    )
    metrics.update(
        {
            "advantage/zero_variance_frac": advantages.zero_variance_groups.float().mean().item(),
            "advantage/abs_mean": advantages.values.abs().mean().item(),
        }
    )
    if not keep.any():
        return None, metrics
    rows = keep.nonzero().squeeze(1).tolist()
    batch = build_train_batch([samples[i] for i in rows], advantages.values[keep], pad_token_id)
    return batch, metrics


def update_policy(
    learner: Learner,
    batch: TrainBatch,
    algo: AlgorithmConfig,
    generator: torch.Generator,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """K minibatch updates in one learner call (one request to the ranks, not K). Every minibatch's
    log-probs come back from the same forward as its update (before it): the first minibatch's give the
    train/infer check, all of them the ratio diagnostics (`ratio/*`, see ratio_metrics)."""
    start, per_minibatch, checks = time.perf_counter(), [], {}
    minibatches = split_minibatches(batch, algo.updates_per_batch, generator)
    results = learner.train_steps(minibatches, [True] * len(minibatches))
    log_ratios: list[torch.Tensor] = []
    for index, (minibatch, result) in enumerate(zip(minibatches, results, strict=True)):
        if result.logprobs is not None:
            mask = minibatch.response_mask.bool()
            if index == 0:
                checks = train_infer_metrics(result.logprobs[mask], minibatch.old_logprobs[mask])
            log_ratios.append((result.logprobs[mask] - minibatch.old_logprobs[mask]).float())
        per_minibatch.append(result.metrics)
        if guard is not None:
            guard.observe(result.metrics)
    combined = combine_metrics(per_minibatch)
    prefix = loss_prefix(algo.loss)
    out = {
        ("entropy" if key == "entropy" else f"actor/{key}" if key in ACTOR_KEYS else f"{prefix}/{key}"): value
        for key, value in combined.items()
    }
    out.update(checks)
    if len(log_ratios) == len(minibatches):
        out.update(ratio_metrics(log_ratios, ratio_bounds(algo.loss, algo.loss_kwargs)))
    out["time/train_s"] = time.perf_counter() - start
    out["train/tokens"] = float(batch.num_response_tokens())
    return out


def train_infer_metrics(learner_lp: torch.Tensor, engine_lp: torch.Tensor) -> dict[str, float]:
    """How far the engine's behaviour log-probs are from the learner's for the same tokens and weights."""
    if learner_lp.numel() < 2 or learner_lp.std() == 0 or engine_lp.std() == 0:
        corr = float("nan")
    else:
        corr = torch.corrcoef(torch.stack([learner_lp.double(), engine_lp.double()]))[0, 1].item()
    diff = (learner_lp - engine_lp).abs()
    return {
        "train_infer/logprob_corr": corr,
        "train_infer/logprob_max_abs_diff": diff.max().item() if diff.numel() else float("nan"),
    }
