"""The built-in rewards, registered by name (imported lazily by the registry)."""

from __future__ import annotations

import os
from collections.abc import Callable

from rewards import code as _code
from rewards import math as _math
from rewards.base import RewardInput, RewardResult
from rewards.extract import answer_tag, final_answer
from rewards.format import char_share_reward, format_reward
from rewards.genrm import genrm_reward
from rewards.length import overlong_reward
from rewards.logic import logic_reward
from rewards.registry import register_reward
from sandboxes import Limits, Sandbox

register_reward("logic")(logic_reward)
register_reward("format")(format_reward)
register_reward("char_share")(char_share_reward)
register_reward("overlong", low=-1.0, high=0.0)(overlong_reward)

_sandboxes: dict[tuple[str, str], Sandbox] = {}


def _sandbox(name: str | None, python: str = "auto") -> Sandbox | None:
    """``python``: reward.code.python (rewards.code.sandbox_python says what ``auto`` means)."""
    if name is None and python == "auto":
        return None  # the process-wide default (rewards.code.default_sandbox)
    key = (name or os.environ.get(_code.SANDBOX_ENV, "bwrap"), python)
    if key not in _sandboxes:
        _sandboxes[key] = _code.make_sandbox(*key)
    return _sandboxes[key]


@register_reward("math")
def math_reward(inp: RewardInput, *, strict_format: bool = True) -> RewardResult:
    """math-verify against ``inp.reference``; ``strict_format``: no answer marker scores 0 (off: the last
    expression is scored)."""
    if inp.reference is None:
        raise ValueError("math reward: the sample has no reference answer")
    return _math.check(inp.completion, str(inp.reference), strict_format=strict_format)


@register_reward("code")
def code_reward(
    inp: RewardInput,
    *,
    sandbox: str | None = None,
    timeout_s: float = 10.0,
    memory_mb: int | None = None,
    python: str = "auto",
) -> RewardResult:
    """``inp.reference`` is the tests' Python source; ``sandbox`` names a backend (default $CISPO_SANDBOX);
    ``python``: the sandbox's interpreter (reward.code.python)."""
    limits = Limits(memory_bytes=memory_mb << 20) if memory_mb else None
    box = _sandbox(sandbox, python)
    return _code.check(inp.completion, inp.reference, sandbox=box, timeout_s=timeout_s, limits=limits)


@register_reward("code_io")
def code_io_reward(
    inp: RewardInput,
    *,
    sandbox: str | None = None,
    timeout_s: float = 5.0,
    partial: bool = False,
    python: str = "auto",
) -> RewardResult:
    """``inp.reference`` holds stdin/stdout cases (see rewards.code.check_io); ``python`` as for ``code``."""
    box = _sandbox(sandbox, python)
    return _code.check_io(inp.completion, inp.reference, sandbox=box, timeout_s=timeout_s, partial=partial)


@register_reward("exact_match")
def exact_match(inp: RewardInput, *, extract: str = "none", case_sensitive: bool = False) -> RewardResult:
    """The answer equals the reference after stripping. ``extract``: none (default: the whole completion,
    as the built-in addition task answers), final_answer (last ``\\boxed{}``, ``#### x``, "the final answer
    is x") or answer_tag (``<answer>``). The default lives here, not in configs/reward/exact_match.yaml,
    so ``reward.rewards=[{name: exact_match}, ...]`` scores as ``reward=exact_match`` does."""
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


# A GenRMReward object: per-sample __call__ plus score_batch, which the scorer sends whole batches to.
register_reward("genrm")(genrm_reward)
