"""The learning half of a step: scored samples -> group advantages -> TrainBatch -> K off-policy minibatch
updates on the learner, their metrics combined by the one rule in cispo.core.metrics.

Metric names: what the loss function reports (clip fractions, IS-weight statistics, approx. KL) and the
loss value go under the loss's own name, `cispo/...`, `grpo/...`, `dapo/...` (a loss given by a
`pkg.module:fn` path logs under `actor/`); what belongs to the optimizer and the policy rather than to the
algorithm (`actor/grad_norm`, `actor/lr`, `actor/router_aux_loss`) under `actor/`; `entropy` and
`train_infer/*` stay unprefixed.
"""

from __future__ import annotations

import time

import torch

from cispo.algo.advantages import AdvantageFn
from cispo.core.config import AlgorithmConfig
from cispo.core.metrics import combine_metrics
from cispo.core.types import Sample, TrainBatch
from cispo.driver.batch import build_train_batch, split_minibatches
from cispo.learner import Learner

ACTOR_KEYS = ("grad_norm", "lr", "router_aux_loss", "skipped_frac")


class NonFiniteUpdates(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


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
    )


def make_train_batch(
    samples: list[Sample], algo: AlgorithmConfig, advantage_fn: AdvantageFn, pad_token_id: int
) -> tuple[TrainBatch | None, dict[str, float]]:
    """Group advantages; zero-variance groups carry no signal and are dropped when configured."""
    rewards = torch.tensor([s.reward for s in samples])
    advantages = advantage_fn(rewards, algo.group_size, **algo.advantage_kwargs)
    keep = (
        advantages.keep_rows(algo.group_size)
        if algo.filter_zero_variance
        else torch.ones(len(samples), dtype=torch.bool)
    )
    metrics = {
        "advantage/zero_variance_frac": advantages.zero_variance_groups.float().mean().item(),
        "advantage/abs_mean": advantages.values.abs().mean().item(),
    }
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
    """K minibatch updates; the first minibatch's forward (before any update) gives the train/infer check."""
    start, per_minibatch, checks = time.perf_counter(), [], {}
    for index, minibatch in enumerate(split_minibatches(batch, algo.updates_per_batch, generator)):
        result = learner.train_step(minibatch, return_logprobs=index == 0)
        if result.logprobs is not None:
            mask = minibatch.response_mask.bool()
            checks = train_infer_metrics(result.logprobs[mask], minibatch.old_logprobs[mask])
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
