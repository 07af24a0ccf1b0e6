"""Format reward: 1.0 when the completion has the expected shape (reasoning block, answer tags, box)."""

from __future__ import annotations

import functools
import re

from rewards.base import RewardInput, RewardResult

STYLES: dict[str, str] = {
    # a non-empty <think> block followed by a non-empty answer
    "think": r"\A\s*<think>\s*\S.*?</think>\s*\S",
    # <think>..</think> then <answer>..</answer> and nothing after it
    "think_answer": r"\A\s*<think>\s*\S.*?</think>\s*<answer>\s*\S.*?</answer>\s*\Z",
    "answer_tags": r"<answer>\s*\S.*?</answer>",
    "boxed": r"\\boxed\s*\{.+?\}",
}


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def format_reward(inp: RewardInput, *, style: str = "think", pattern: str | None = None) -> RewardResult:
    """``style`` picks a built-in shape (see STYLES); ``pattern`` (a regex, DOTALL) overrides it."""
    label = style if pattern is None else f"pattern {pattern!r}"
    if pattern is None:
        if style not in STYLES:
            raise ValueError(f"format reward: unknown style {style!r}; styles: {', '.join(STYLES)}")
        pattern = STYLES[style]
    if _compile(pattern).search(inp.completion):
        return RewardResult(1.0)
    return RewardResult(0.0, f"format: does not match {label}")


def char_share_reward(inp: RewardInput, *, chars: str = "0123456789") -> RewardResult:
    """The share of the completion's characters that are in ``chars`` (0 for an empty completion).

    A dense signal over the whole trace, for experiments about the machinery of long traces (every token
    of a 4,096-token response moves it), not a task anyone wants solved."""
    if not chars:
        raise ValueError("char_share reward: chars must not be empty")
    text = inp.completion
    if not text:
        return RewardResult(0.0, "char_share: empty completion")
    allowed = set(chars)
    return RewardResult(sum(ch in allowed for ch in text) / len(text))
