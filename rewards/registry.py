"""Find rewards by name: the registry, then a ``pkg.module:function`` path, then the ``cispo.rewards`` entry
point group (other packages can ship rewards without touching this repo)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from rewards.base import RewardFn, RewardInput, RewardResult, adapt_reward_fn, to_result

ENTRY_POINT_GROUP = "cispo.rewards"


@dataclass
class _Entry:
    fn: Callable[..., Any]
    low: float
    high: float


_REGISTRY: dict[str, _Entry] = {}
_builtins_loaded = False


def register_reward(name: str, *, low: float = 0.0, high: float = 1.0) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` under ``name``; ``low``/``high`` is the range its scores must fall in."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REGISTRY[name].fn!r})")
        _REGISTRY[name] = _Entry(fn, low, high)
        return fn

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("rewards.builtin")


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


@dataclass
class LoadedReward:
    """A reward ready to call: contract-checked, kwargs bound, result normalised and range-checked."""

    name: str
    fn: RewardFn
    low: float = 0.0
    high: float = 1.0

    def __call__(self, inp: RewardInput) -> RewardResult:
        return to_result(self.fn(inp), self.name, self.low, self.high)


def _from_dotted(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward {path!r} is not callable")
    return obj


def _from_entry_point(name: str) -> Callable[..., Any] | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


def get_reward(name_or_path: str, **kwargs: Any) -> LoadedReward:
    """Load a reward by registered name, ``pkg.mod:fn`` path or ``cispo.rewards`` entry point.

    ``kwargs`` are bound as the reward's keyword arguments. Unknown names raise ValueError listing the
    registered ones; a signature that breaks the contract raises TypeError naming the reward.
    """
    _load_builtins()
    if name_or_path in _REGISTRY:
        entry = _REGISTRY[name_or_path]
        return LoadedReward(
            name_or_path, adapt_reward_fn(entry.fn, name_or_path, kwargs), entry.low, entry.high
        )
    if ":" in name_or_path:
        fn = _from_dotted(name_or_path)
    else:
        found = _from_entry_point(name_or_path)
        if found is None:
            raise ValueError(
                f"unknown reward {name_or_path!r}; registered: {', '.join(available_rewards())}; "
                f"or use 'package.module:function' or a '{ENTRY_POINT_GROUP}' entry point"
            )
        fn = found
    return LoadedReward(name_or_path, adapt_reward_fn(fn, name_or_path, kwargs))
