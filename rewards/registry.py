"""Find rewards by name: the registry, then a ``pkg.module:function`` or ``path/to/file.py:function`` path,
then the ``cispo.rewards`` entry point group (other packages can ship rewards without touching this repo).

A reward's score range is declared on the function itself (:func:`reward_range`, or ``register_reward(...,
low=, high=)``), so every way of naming it finds the same range; a config entry's ``low``/``high`` override
it. Metric keys use a reward's short name (:func:`metric_keys`): ``reward/digit_credit/mean``, not the
plugin's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cispo.core.registry import Registry, callable_from, is_file_path
from rewards.base import RewardFn, RewardInput, RewardResult, adapt_reward_fn, to_result

ENTRY_POINT_GROUP = "cispo.rewards"
RANGE_ATTR = "__cispo_reward_range__"
DEFAULT_RANGE = (0.0, 1.0)
F = TypeVar("F", bound=Callable[..., Any])

# Built-ins register themselves (with their score ranges) when rewards.builtin is first imported.
REWARDS: Registry[Callable[..., Any]] = Registry(
    "reward",
    ENTRY_POINT_GROUP,
    lazy={
        "char_share": "rewards.builtin:char_share_reward",
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


def check_range(low: float, high: float, name: str) -> tuple[float, float]:
    """``(low, high)`` as floats; ValueError naming the reward unless both are finite and low < high."""
    try:
        lo, hi = float(low), float(high)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward {name!r}: score range low={low!r}, high={high!r} is not numeric") from err
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"reward {name!r}: score range [{low}, {high}] needs finite low < high")
    return lo, hi


def reward_range(low: float, high: float) -> Callable[[F], F]:
    """Decorator: the range of ``fn``'s scores (a penalty: ``low < 0``), found however ``fn`` is named."""
    bounds = check_range(low, high, "reward_range")

    def deco(fn: F) -> F:
        try:
            setattr(fn, RANGE_ATTR, bounds)
        except (AttributeError, TypeError):  # a builtin or a bound method: only a registered name carries it
            pass
        return fn

    return deco


def register_reward(
    name: str, *, low: float | None = None, high: float | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` under ``name``; ``low``/``high``: the range its scores fall in (default:
    the one declared with :func:`reward_range`, else [0, 1])."""

    def deco(fn: Callable) -> Callable:
        if low is None and high is None:
            return REWARDS.register(name, fn)
        declared = declared_range(fn)
        bounds = check_range(declared[0] if low is None else low, declared[1] if high is None else high, name)
        reward_range(*bounds)(fn)
        return REWARDS.register(name, fn, low=bounds[0], high=bounds[1])

    return deco


def declared_range(fn: Any) -> tuple[float, float]:
    bounds = getattr(fn, RANGE_ATTR, None)
    return tuple(bounds) if isinstance(bounds, tuple) and len(bounds) == 2 else DEFAULT_RANGE  # type: ignore


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


def load_reward(
    name_or_path: str, kwargs: dict | None = None, *, low: float | None = None, high: float | None = None
) -> LoadedReward:
    """A reward by registered name, ``pkg.mod:fn`` / ``file.py:fn`` path or ``cispo.rewards`` entry point,
    with ``kwargs`` bound and its score range: ``low``/``high`` when given (a config entry's), else the
    one its registration or :func:`reward_range` declared, else [0, 1].

    Unknown names raise ValueError listing the registered ones; a signature that breaks the contract, or a
    kwarg it does not take, raises TypeError naming the reward; a bad range, ValueError naming it.
    """
    fn = callable_from(REWARDS, name_or_path)
    meta = REWARDS.metadata(name_or_path) if name_or_path in REWARDS else {}
    declared = (meta["low"], meta["high"]) if "low" in meta and "high" in meta else declared_range(fn)
    bounds = check_range(
        declared[0] if low is None else low, declared[1] if high is None else high, name_or_path
    )
    return LoadedReward(name_or_path, adapt_reward_fn(fn, name_or_path, kwargs), *bounds)


def get_reward(name_or_path: str, **kwargs: Any) -> LoadedReward:
    """:func:`load_reward` with ``kwargs`` as the reward's keyword arguments and its declared range."""
    return load_reward(name_or_path, kwargs)


class RewardEntry(Protocol):
    """One reward of a mix as a config gives it (cispo.core.config.RewardItem, rewards.scorer.RewardSpec)."""

    name: str
    weight: float
    kwargs: dict
    low: float | None
    high: float | None


def full_score(entries: Iterable[RewardEntry]) -> float:
    """The best combined score a mix can give: each weight times the top of its reward's range (the bottom
    for a negative weight), so a penalty in the mix (``overlong``: [-1, 0]) adds 0, not its weight."""
    total = 0.0
    for e in entries:
        loaded = load_reward(e.name, dict(e.kwargs), low=e.low, high=e.high)
        total += max(e.weight * loaded.low, e.weight * loaded.high)
    return total


def reward_key(name: str) -> str:
    """A reward's short name for metric keys and reasons: a registered name as is, a plugin's function name
    (``myrewards:digit_credit`` and ``/abs/path/myrewards.py:digit_credit`` -> ``digit_credit``)."""
    return name.partition(":")[2] or name


def _long_key(name: str) -> str:
    module, sep, attr = name.partition(":")
    if not sep:
        return name
    return f"{Path(module).stem}:{attr}" if is_file_path(name) else name


def metric_keys(names: list[str]) -> list[str]:
    """One distinct key per reward of a mix: the short name, the module's or file's name in front where two
    short names collide, and ``_2``, ``_3``... for a reward listed more than once."""
    short = [reward_key(n) for n in names]
    keys = [_long_key(n) if short.count(s) > 1 else s for n, s in zip(names, short)]
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return out
