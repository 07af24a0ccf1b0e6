"""Advantage estimators for group-sampled RL, chosen by name from a small registry.

rewards are laid out group-contiguously: rows [g * G, (g + 1) * G) are the G responses to prompt g.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cispo.core.registry import Registry, callable_from


@dataclass
class Advantages:
    """values [N]; zero_variance_groups [N // G] bool: groups whose rewards were all equal (no signal)."""

    values: Tensor
    zero_variance_groups: Tensor

    def keep_rows(self, group_size: int) -> Tensor:
        """Row mask [N] that drops the zero-variance groups (for filtering / dynamic sampling)."""
        return (~self.zero_variance_groups).repeat_interleave(group_size)


AdvantageFn = Callable[..., Advantages]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", "cispo.advantages")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return ADVANTAGES.register(name)


def get_advantage(name: str) -> AdvantageFn:
    return callable_from(ADVANTAGES, name)


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.to(torch.float32).view(-1, group_size)


@register_advantage("group")
def group_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True
) -> Advantages:
    """A_i = (R_i - mean_group(R)) / (std_group(R) + eps), the report's group normalisation.

    std is the population std (divide by G), as in the report's formula. Groups whose rewards are all
    equal get exactly zero advantage (not 0/eps noise) and are flagged. scale_by_std=False gives
    Dr. GRPO's mean-centring only.
    """
    grouped = _grouped(rewards, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    centred = grouped - mean
    values = centred / (std + eps) if scale_by_std else centred
    values = torch.where(zero_variance.unsqueeze(1), torch.zeros_like(values), values)
    return Advantages(values.reshape(-1), zero_variance)


@register_advantage("batch")
def batch_normalized_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Advantages:
    """Centre by the group mean, scale by the std of the whole batch (REINFORCE++-style, more stable
    when groups are small); zero-variance groups still get exactly zero."""
    grouped = _grouped(rewards, group_size)
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    values = centred / (grouped.std(unbiased=False) + eps)
    values = torch.where(zero_variance.unsqueeze(1), torch.zeros_like(values), values)
    return Advantages(values.reshape(-1), zero_variance)
