"""The reward plugin contract.

A reward is any callable that takes one :class:`RewardInput` and returns a float in ``[0, 1]`` or a
:class:`RewardResult` (score plus a short reason, e.g. why it is 0)::

    from rewards import RewardInput, RewardResult, register_reward

    @register_reward("mentions_reference")
    def mentions_reference(inp: RewardInput, *, bonus: float = 1.0) -> RewardResult:
        if str(inp.reference) in inp.completion:
            return RewardResult(bonus, "")
        return RewardResult(0.0, "reference not in completion")

Configuration values reach the reward as keyword-only arguments (``RewardSpec.kwargs``); they are checked
against the signature when the reward is loaded. Functions of the shape ``fn(completion, reference)``
(such as ``rewards.math:score``) are accepted too and receive ``inp.completion`` and ``inp.reference``.
A penalty (e.g. ``overlong``) registers its own range, such as ``[-1, 0]``.

Rewards may raise: the scorer turns an exception or a timeout into 0 with the reason counted in metrics,
or, in strict mode, into a :class:`RewardError` naming the reward and the sample.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardInput:
    """One sample to score: the prompt, the model's completion, the dataset row's reference and metadata."""

    prompt: str
    completion: str
    reference: Any = None
    metadata: dict = field(default_factory=dict)


@dataclass
class RewardResult:
    score: float
    reason: str = ""


RewardFn = Callable[[RewardInput], float | RewardResult]


class RewardError(RuntimeError):
    """A reward failed in strict mode, or a plugin broke its contract."""


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _required_positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.kind in _POSITIONAL and p.default is p.empty]


def adapt_reward_fn(fn: Callable[..., Any], name: str, kwargs: dict | None = None) -> RewardFn:
    """Check ``fn`` against the contract and bind ``kwargs``; returns a ``RewardFn``.

    Raises TypeError naming the reward when the signature does not fit or a kwarg is unknown or missing.
    """
    kwargs = dict(kwargs or {})
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward {name!r}: cannot inspect the signature of {fn!r}") from e
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    positional = _required_positional(sig)
    if len(positional) not in (1, 2):
        raise TypeError(
            f"reward {name!r}: expected fn(input: RewardInput, *, ...) or fn(completion, reference), "
            f"got {fn.__name__ if hasattr(fn, '__name__') else fn}{sig}"
        )
    named = {p.name for p in positional}
    unknown = [k for k in kwargs if k in named or (k not in params and not takes_var_kw)]
    if unknown:
        raise TypeError(f"reward {name!r}: unknown argument(s) {unknown}; signature is {sig}")
    missing = [
        p.name
        for p in params.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in kwargs
    ]
    if missing:
        raise TypeError(f"reward {name!r}: missing required argument(s) {missing} (set them in kwargs)")
    if len(positional) == 1:
        return lambda inp: fn(inp, **kwargs)
    return lambda inp: fn(inp.completion, inp.reference, **kwargs)


def to_result(value: Any, name: str, low: float = 0.0, high: float = 1.0) -> RewardResult:
    """Normalise a reward's return value; RewardError for a wrong type, NaN or an out-of-range score."""
    if isinstance(value, RewardResult):
        result = RewardResult(value.score, value.reason)
    elif isinstance(value, (int, float)):
        result = RewardResult(float(value))
    else:
        raise RewardError(f"reward {name!r} returned {type(value).__name__}; expected float or RewardResult")
    try:
        result.score = float(result.score)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} returned a non-numeric score {result.score!r}") from e
    if math.isnan(result.score) or not low <= result.score <= high:
        raise RewardError(f"reward {name!r} returned {result.score} outside [{low}, {high}]")
    return result
