"""Rewards: a registry of plugins (see ``rewards.base`` for the contract) and a weighted, timed scorer.

Built-in names: math, logic, code, code_io, format, overlong, exact_match, genrm. Rewards import
``sandboxes`` and ``cispo.core`` (the registry) and nothing else of ours.
"""

from rewards.base import RewardError, RewardFn, RewardInput, RewardResult, RewardTimeout
from rewards.registry import available_rewards, get_reward, register_reward, reward_range
from rewards.scorer import RewardScorer, RewardSpec

__all__ = [
    "RewardError",
    "RewardFn",
    "RewardInput",
    "RewardResult",
    "RewardScorer",
    "RewardSpec",
    "RewardTimeout",
    "available_rewards",
    "get_reward",
    "register_reward",
    "reward_range",
]
