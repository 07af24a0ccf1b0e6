"""The reward plugin contract.

A reward is any callable that takes one :class:`RewardInput` and returns a float or a :class:`RewardResult`
(score plus a short reason, e.g. why it is 0)::

    from rewards import RewardInput, RewardResult, register_reward

    @register_reward("mentions_reference")
    def mentions_reference(inp: RewardInput, *, bonus: float = 1.0) -> RewardResult:
        if str(inp.reference) in inp.completion:
            return RewardResult(bonus, "")
        return RewardResult(0.0, "reference not in completion")

Configuration values reach the reward as keyword-only arguments (``RewardSpec.kwargs``); they are checked
against the signature when the reward is loaded, and what the config leaves out takes the signature's
default. Functions of the shape ``fn(completion, reference)`` (such as ``rewards.math:score``) are accepted
too and receive ``inp.completion`` and ``inp.reference``.

Range: scores must fall in ``[0, 1]`` unless the reward declares another range, which penalties need
(``overlong`` declares ``[-1, 0]``). Declare it on the function, where every way of naming it finds it
(registered name, ``pkg.mod:fn``, ``file.py:fn``, entry point): ``@register_reward("name", low=-1, high=1)``
or, without registering a name, ``@reward_range(-1, 1)``; or in the config (``{name: ..., low: -1,
high: 1}``), which overrides the declaration. A score outside the range, or NaN, is an error naming the
reward and the value.

Rewards may raise: the scorer turns an exception into 0 with the reason counted in metrics
(``reward/errors``), or, in strict mode, into a :class:`RewardError` naming the reward and the sample. A
reward that runs out of its own time budget raises :class:`RewardTimeout`: counted with the scorer's own
timeouts (``reward/timeouts``), never a silent 0. Errors and timeouts both count toward
``reward.stop_error_fraction``.
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


class RewardTimeout(RewardError):
    """A reward ran out of its own time budget (e.g. the math verifier's CPU time): the scorer counts it as a
    timeout, like one past ``reward.timeout_s``, rather than as an error."""


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
        raise RewardError(
            f"reward {name!r} returned {result.score} outside [{low}, {high}]; a reward with another range "
            "declares it (@register_reward(name, low=, high=), @reward_range(low, high), or low:/high: in "
            "its reward.rewards entry)"
        )
    return result
