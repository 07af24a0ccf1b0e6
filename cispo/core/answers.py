"""Answer extractors: the reference answer from a dataset's answer column (data.answer_extractor).

An extractor takes the column's text and returns the answer the reward compares against, or None when
the text holds no answer in its format (the loader then refuses the row, naming it and the column).
Built in: ``none`` (the text as it is), ``gsm8k`` (what follows the last ``####``, GSM8K's solutions),
``boxed`` (the last ``\\boxed{...}``, MATH-style solutions); or ``package.module:function``, or an entry
point in the group ``cispo.answer_extractors``.
"""

from __future__ import annotations

from collections.abc import Callable

from cispo.core.registry import Registry

AnswerExtractor = Callable[[str], "str | None"]
ANSWER_EXTRACTORS: Registry[AnswerExtractor] = Registry("answer extractor", "cispo.answer_extractors")


@ANSWER_EXTRACTORS.register("none")
def whole_text(text: str) -> str | None:
    """The column as it is (stripped); None when blank."""
    return text.strip() or None


@ANSWER_EXTRACTORS.register("gsm8k")
def after_hashes(text: str) -> str | None:
    """GSM8K: the solution ends with "#### <number>"; thousands separators are dropped ("1,000" -> "1000")
    so that the reference is a plain number."""
    head, hashes, tail = text.rpartition("####")
    answer = tail.strip().replace(",", "")
    return answer if hashes and answer else None


def _braced(text: str, start: int) -> str | None:
    """The contents of the brace group opening at text[start] ("{"), nested braces balanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1 : i] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


@ANSWER_EXTRACTORS.register("boxed")
def last_boxed(text: str) -> str | None:
    """MATH: the contents of the solution's last \\boxed{...} (or \\fbox{...}), nested braces kept."""
    starts = [text.rfind(marker) for marker in ("\\boxed", "\\fbox")]
    start = max(starts)
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start:brace].strip() not in ("\\boxed", "\\fbox"):
        return None
    inside = _braced(text, brace)
    return inside.strip() if inside and inside.strip() else None
