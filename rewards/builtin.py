"""The built-in rewards, registered by name (imported lazily by the registry)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rewards import code as _code
from rewards import math as _math
from rewards.base import RewardInput, RewardResult
from rewards.extract import answer_tag, final_answer
from rewards.format import format_reward
from rewards.genrm import GenerativeRewardModel
from rewards.length import overlong_reward
from rewards.logic import logic_reward
from rewards.registry import register_reward
from sandboxes import Limits, Sandbox, get_sandbox

register_reward("logic")(logic_reward)
register_reward("format")(format_reward)
register_reward("overlong", low=-1.0, high=0.0)(overlong_reward)

_sandboxes: dict[str, Sandbox] = {}


def _sandbox(name: str | None) -> Sandbox | None:
    if name is None:
        return None  # the process-wide default (rewards.code.default_sandbox)
    if name not in _sandboxes:
        _sandboxes[name] = get_sandbox(name)
    return _sandboxes[name]


@register_reward("math")
def math_reward(inp: RewardInput, *, strict_format: bool = True) -> RewardResult:
    """math-verify against ``inp.reference``; ``strict_format``: no answer marker scores 0 (off: the last
    expression is scored)."""
    if inp.reference is None:
        raise ValueError("math reward: the sample has no reference answer")
    return _math.check(inp.completion, str(inp.reference), strict_format=strict_format)


@register_reward("code")
def code_reward(
    inp: RewardInput, *, sandbox: str | None = None, timeout_s: float = 10.0, memory_mb: int | None = None
) -> RewardResult:
    """``inp.reference`` is the tests' Python source; ``sandbox`` names a backend (default $CISPO_SANDBOX)."""
    limits = Limits(memory_bytes=memory_mb << 20) if memory_mb else None
    return _code.check(
        inp.completion, inp.reference, sandbox=_sandbox(sandbox), timeout_s=timeout_s, limits=limits
    )


@register_reward("code_io")
def code_io_reward(
    inp: RewardInput, *, sandbox: str | None = None, timeout_s: float = 5.0, partial: bool = False
) -> RewardResult:
    """``inp.reference`` holds stdin/stdout cases (see rewards.code.check_io)."""
    return _code.check_io(
        inp.completion, inp.reference, sandbox=_sandbox(sandbox), timeout_s=timeout_s, partial=partial
    )


@register_reward("exact_match")
def exact_match(
    inp: RewardInput, *, extract: str = "final_answer", case_sensitive: bool = False
) -> RewardResult:
    """Final answer (``extract``: final_answer | answer_tag | none) equals the reference after stripping."""
    extractors: dict[str, Callable[[str], str | None]] = {
        "final_answer": final_answer,
        "answer_tag": answer_tag,
        "none": lambda s: s,
    }
    if extract not in extractors:
        raise ValueError(f"exact_match reward: unknown extract {extract!r}; choose from {list(extractors)}")
    got = extractors[extract](inp.completion)
    if got is None:
        return RewardResult(0.0, "exact_match: no answer found")
    want = str(inp.reference).strip()
    got = got.strip()
    same = got == want if case_sensitive else got.casefold() == want.casefold()
    return RewardResult(1.0 if same else 0.0, "" if same else "exact_match: different answer")


_judges: dict[Any, GenerativeRewardModel] = {}


@register_reward("genrm")
def genrm_reward(
    inp: RewardInput, *, generate: str | Callable, template: str | None = None, max_score: float = 10.0
) -> RewardResult:
    """``generate``: a callable or its ``pkg.mod:fn`` path, ``generate(prompts) -> completions``."""
    key = (generate, template, max_score)
    if key not in _judges:
        fn = generate
        if isinstance(generate, str):
            module, _, attr = generate.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        kwargs = {"template": template} if template else {}
        _judges[key] = GenerativeRewardModel(fn, max_score=max_score, **kwargs)  # type: ignore[arg-type]
    return _judges[key](inp)
