"""Find rewards by name: the registry, then a ``pkg.module:function`` path, then the ``cispo.rewards`` entry
point group (other packages can ship rewards without touching this repo)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cispo.core.registry import Registry, callable_from
from rewards.base import RewardFn, RewardInput, RewardResult, adapt_reward_fn, to_result

ENTRY_POINT_GROUP = "cispo.rewards"

# Built-ins register themselves (with their score ranges) when rewards.builtin is first imported.
REWARDS: Registry[Callable[..., Any]] = Registry(
    "reward",
    ENTRY_POINT_GROUP,
    lazy={
        "code": "rewards.builtin:code_reward",
        "code_io": "rewards.builtin:code_io_reward",
        "exact_match": "rewards.builtin:exact_match",
        "format": "rewards.builtin:format_reward",
        "genrm": "rewards.builtin:genrm_reward",
        "logic": "rewards.builtin:logic_reward",
        "math": "rewards.builtin:math_reward",
        "overlong": "rewards.builtin:overlong_reward",
    },
)


def register_reward(name: str, *, low: float = 0.0, high: float = 1.0) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` under ``name``; ``low``/``high`` is the range its scores must fall in."""

    def deco(fn: Callable) -> Callable:
        return REWARDS.register(name, fn, low=low, high=high)

    return deco


def available_rewards() -> list[str]:
    return REWARDS.names()


@dataclass
class LoadedReward:
    """A reward ready to call: contract-checked, kwargs bound, result normalised and range-checked."""

    name: str
    fn: RewardFn
    low: float = 0.0
    high: float = 1.0

    def __call__(self, inp: RewardInput) -> RewardResult:
        return to_result(self.fn(inp), self.name, self.low, self.high)


def get_reward(name_or_path: str, **kwargs: Any) -> LoadedReward:
    """Load a reward by registered name, ``pkg.mod:fn`` path or ``cispo.rewards`` entry point.

    ``kwargs`` are bound as the reward's keyword arguments. Unknown names raise ValueError listing the
    registered ones; a signature that breaks the contract raises TypeError naming the reward.
    """
    fn = callable_from(REWARDS, name_or_path)
    meta = REWARDS.metadata(name_or_path) if name_or_path in REWARDS else {}
    return LoadedReward(
        name_or_path,
        adapt_reward_fn(fn, name_or_path, kwargs),
        meta.get("low", 0.0),
        meta.get("high", 1.0),
    )
