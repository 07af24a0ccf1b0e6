"""Policy losses for RL on reasoning traces, chosen by name from a small registry.

Every loss is a pure function of tensors with an explicit mask::

    loss_fn(logprobs, old_logprobs, advantages, mask, *, normalizer=..., group_ids=None,
            token_weights=None, **hyper) -> (loss, metrics)

    logprobs      [B, T]  log pi_theta(o_t | q, o_<t) of the sampled tokens (carries the gradient)
    old_logprobs  [B, T]  behaviour log-probs from the rollout engine (never differentiated)
    advantages    [B] or [B, T]
    mask          [B, T]  1 for response tokens that are trained, 0 for prompt and padding
    group_ids     [B]     prompt-group of each row (needed by the "group" normaliser)
    token_weights [B, T]  precomputed normalisation weights (see ``normalization_weights``); when given,
                          ``normalizer`` is ignored. Learners compute them once over a whole minibatch so
                          that micro-batched gradients equal the full-batch gradient exactly.

The returned metrics are detached scalars.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from cispo.core.config import NORMALIZERS
from cispo.core.registry import Registry, callable_from


class PolicyLoss(Protocol):
    def __call__(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, **kwargs: object
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


LOSSES: Registry[PolicyLoss] = Registry("policy loss", "cispo.losses")


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    return LOSSES.register(name)


def get_policy_loss(name: str) -> PolicyLoss:
    """A registered loss, or ``package.module:fn`` (resolved where it is called: driver, rank or worker)."""
    return callable_from(LOSSES, name)


def registered_losses() -> list[str]:
    return LOSSES.names()


def _check_shapes(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Validates shapes and returns advantages broadcast to [B, T]."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logprobs has {tuple(logprobs.shape)}"
            )
    if advantages.shape == logprobs.shape[:1]:
        return advantages.unsqueeze(1).expand_as(logprobs)
    if advantages.shape == logprobs.shape:
        return advantages
    raise ValueError(
        f"advantages must be [B] or [B, T] = {list(logprobs.shape)}, got {list(advantages.shape)}"
    )


def normalization_weights(
    mask: Tensor,
    normalizer: str = "token",
    group_ids: Tensor | None = None,
    sample_level_weight: float = 0.5,
) -> Tensor:
    """Per-token weights c[b, t] so that loss = -sum(c * per_token_objective); zero where mask is 0.

    token         1 / sum(mask)                            (DAPO / CISPO token-level default)
    group         1 / (n_groups * tokens in the row's group) (the report's 1/sum_i|o_i| per prompt)
    sample        1 / (B * tokens in the row)              (GRPO's per-sequence mean, then batch mean)
    sample_token  a * sample + (1 - a) * token, a = sample_level_weight (sample-level + token-level mix
                  against pattern collapse: long responses do not drown short ones entirely)
    Rows without any trained token get weight 0 and do not count towards B or n_groups.
    """
    mask = mask.to(torch.float32)
    row_tokens = mask.sum(dim=1, keepdim=True)
    if normalizer == "token":
        return mask / mask.sum().clamp(min=1.0)
    if normalizer == "sample":
        live_rows = (row_tokens > 0).sum().clamp(min=1)
        return mask / row_tokens.clamp(min=1.0) / live_rows
    if normalizer == "sample_token":
        if not 0.0 <= sample_level_weight <= 1.0:
            raise ValueError(f"sample_level_weight must be in [0, 1], got {sample_level_weight}")
        sample = normalization_weights(mask, "sample")
        token = normalization_weights(mask, "token")
        return sample_level_weight * sample + (1.0 - sample_level_weight) * token
    if normalizer == "group":
        if group_ids is None or group_ids.shape != mask.shape[:1]:
            raise ValueError("normalizer='group' needs group_ids of shape [B]")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        group_tokens = torch.zeros(int(inverse.max()) + 1, dtype=mask.dtype, device=mask.device)
        group_tokens.index_add_(0, inverse.to(mask.device), row_tokens.squeeze(1))
        live_groups = (group_tokens > 0).sum().clamp(min=1)
        return mask / group_tokens[inverse].clamp(min=1.0).unsqueeze(1) / live_groups
    raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {list(NORMALIZERS)}")


def _weights(mask: Tensor, normalizer: str, group_ids: Tensor | None, token_weights: Tensor | None) -> Tensor:
    if token_weights is None:
        return normalization_weights(mask, normalizer, group_ids)
    if token_weights.shape != mask.shape:
        raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}, mask {tuple(mask.shape)}")
    return token_weights * mask


@torch.no_grad()
def _ratio_metrics(
    ratio: Tensor, log_ratio: Tensor, mask: Tensor, low: float, high: float, is_weight: Tensor
) -> dict[str, Tensor]:
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)
    above = (ratio > high).to(torch.float32) * m
    below = (ratio < low).to(torch.float32) * m
    live = m > 0
    # k3 estimator of KL(old || new): unbiased, non-negative per token (Schulman's approximation).
    approx_kl = (ratio - 1.0) - log_ratio
    return {
        "clip_frac_high": above.sum() / n,
        "clip_frac_low": below.sum() / n,
        "clip_frac": (above + below).sum() / n,
        "is_weight_mean": (is_weight * m).sum() / n,
        "is_weight_max": is_weight[live].max() if live.any() else torch.zeros(()),
        "ratio_mean": (ratio * m).sum() / n,
        "approx_kl": (approx_kl * m).sum() / n,
    }


@register_policy_loss("cispo")
def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 4.0,
    token_mask: bool = False,
    normalizer: str = "token",
    group_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, eq. 4): clip the importance-sampling weight, never the token's gradient.

        r_t = exp(logprobs - old_logprobs)
        w_t = clip(r_t, 1 - eps_low, 1 + eps_high).detach()
        loss = -sum_{i,t} c_{i,t} * w_t * A_i * logprobs_t,   c = 1/sum(mask) by default

    Offset convention: the bounds are 1 - eps_low and 1 + eps_high, as in the report. TRL and ScaleRL
    instead treat epsilon_high as an absolute cap on the weight; TRL's epsilon_high=5.0 equals our
    eps_high=4.0. The report sets no lower bound (eps_low = 1.0 makes the lower bound 0) and tunes only
    eps_high.

    Because w is detached, d loss / d logprobs = -c * w * A: every token keeps a gradient, including
    those whose ratio is clipped (that is CISPO's point against PPO/GRPO, which zero them).

    token_mask=True applies the report's unified form (eq. 7): a token is dropped (M = 0) where A > 0 and
    r > 1 + eps_high, or A < 0 and r < 1 - eps_low, which recovers PPO-style trust-region clipping.

    Shapes: logprobs, old_logprobs, mask [B, T]; advantages [B] or [B, T]; returns a scalar loss.
    """
    adv = _check_shapes(logprobs, old_logprobs, advantages, mask)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    weights = _weights(mask, normalizer, group_ids, token_weights)
    log_ratio = logprobs.detach() - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - eps_low, 1.0 + eps_high
    is_weight = ratio.clamp(min=low, max=high).detach()
    objective = is_weight * adv * logprobs
    if token_mask:
        dropped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
        objective = objective * (~dropped).to(objective.dtype)
    loss = -(weights * objective).sum()
    metrics = _ratio_metrics(ratio, log_ratio, mask, low, high, is_weight)
    if token_mask:
        metrics["token_mask_frac"] = (dropped.float() * mask).sum() / mask.float().sum().clamp(min=1.0)
    return loss, metrics


def _clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    weights: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic surrogate: -min(r A, clip(r, 1-eps_low, 1+eps_high) A), weighted per token."""
    adv = _check_shapes(logprobs, old_logprobs, advantages, mask)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - eps_low, 1.0 + eps_high
    unclipped = ratio * adv
    clipped = ratio.clamp(min=low, max=high) * adv
    loss = -(weights * torch.minimum(unclipped, clipped)).sum()
    metrics = _ratio_metrics(ratio.detach(), log_ratio.detach(), mask, low, high, ratio.detach())
    # PPO zeroes the gradient of exactly these tokens; report them like CISPO's mask for comparison.
    with torch.no_grad():
        zeroed = (clipped < unclipped).to(torch.float32) * mask
        metrics["grad_zeroed_frac"] = zeroed.sum() / mask.float().sum().clamp(min=1.0)
    return loss, metrics


@register_policy_loss("grpo")
def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps: float = 0.2,
    normalizer: str = "sample",
    group_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (DeepSeekMath) without the KL term: PPO clipped surrogate with symmetric eps (0.2) and the
    per-sequence mean of token losses averaged over the batch (normalizer="sample").

    loss = -sum_{i,t} c_{i,t} * min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i); shapes as cispo_loss.
    """
    weights = _weights(mask, normalizer, group_ids, token_weights)
    return _clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps, eps, weights)


@register_policy_loss("dapo")
def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    normalizer: str = "token",
    group_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO: the clipped surrogate with clip-higher (1 - 0.2, 1 + 0.28) and token-level normalisation.

    loss = -sum_{i,t} min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) / sum(mask).
    """
    weights = _weights(mask, normalizer, group_ids, token_weights)
    return _clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, weights)
