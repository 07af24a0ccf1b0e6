"""Math answers checked with math-verify after extracting the final answer as models write it."""

from __future__ import annotations

import logging
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.base import RewardResult
from rewards.extract import MAX_ANSWER_CHARS, final_answer, normalize_spacing

_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_TRIVIAL = re.compile(r"[\s$]|\\text\{|\\mathrm\{|\}|\\left|\\right|\\!|\.$")
VERIFY_TIMEOUT_S = 5


class _NoTimeoutNotice(logging.Filter):
    """math-verify warns on every call made with timeout=None; we bound time ourselves (see _timeout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


def _timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which only works in the main thread; elsewhere the caller bounds
    # time (RewardScorer's per-sample timeout) and the extraction above bounds the input size.
    return VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(answer: str) -> list:
    return parse(f"${answer}$", extraction_config=_CONFIG, parsing_timeout=_timeout())


def check(completion: str, reference: str) -> RewardResult:
    """Score with a reason: 1.0 when the completion's final answer equals ``reference``."""
    if not isinstance(completion, str) or not isinstance(reference, (str, int, float)):
        return RewardResult(
            0.0, f"math: bad input types {type(completion).__name__}/{type(reference).__name__}"
        )
    answer = final_answer(completion)
    if answer is None:
        return RewardResult(0.0, "math: no final answer found")
    gold_text = normalize_spacing(str(reference).strip())
    pred_text = normalize_spacing(answer)
    if len(pred_text) > MAX_ANSWER_CHARS:
        return RewardResult(0.0, "math: answer too long")
    if _TRIVIAL.sub("", pred_text) == _TRIVIAL.sub("", gold_text) and pred_text:
        return RewardResult(1.0)
    gold, pred = _parse(gold_text), _parse(pred_text)
    if not gold:
        return RewardResult(0.0, f"math: reference {str(reference)[:60]!r} could not be parsed")
    if not pred:
        return RewardResult(0.0, "math: answer could not be parsed")
    if verify(gold, pred, timeout_seconds=_timeout()):
        return RewardResult(1.0)
    return RewardResult(0.0, "math: wrong answer")


def score(completion: str, reference: str) -> float:
    """1.0 if the final answer in ``completion`` (last ``\\boxed{}``, ``#### x``, "final answer is x")
    equals ``reference``."""
    return check(completion, reference).score
