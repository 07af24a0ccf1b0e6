"""Math answers checked with math-verify after finding the final answer as models write it.

The answer is found marker first (``rewards.extract.answer_segments``: trailing ``\\boxed{}`` answers,
``<answer>``, ``####``, "Final answer: ...", "the answer is ..."), capped in length, then handed to
math-verify as text so its own LaTeX and expression extraction applies ("Final answer: therefore
$x \\geq 5$ is the solution" reads ``x >= 5``; several trailing boxes read as one set, as math-verify reads
them). An answer written without math delimiters ("Final answer: 2x+3") is read whole as LaTeX, since
math-verify's expression extraction would stop at its first number; one that is prose ("3 hours ago") goes
to math-verify without its marker, so it takes the last number. Commas in numbers are read the way the
reference is written (``rewards.extract.normalize_numerals``).

Time: one check may use ``CPU_LIMIT_S`` seconds of CPU time, not wall time, so a busy machine scores as an
idle one. Past it, :class:`rewards.base.RewardTimeout` is raised (the scorer counts it in
``reward/timeouts``), never a silent 0. math-verify's own timeouts are off: they are wall-clock SIGALRMs
whose expiry it reports as an unparsable answer, i.e. 0 for a right answer on a loaded machine. The budget
is a SIGPROF timer, so it holds in a process's main thread (the reward worker processes); elsewhere (a
thread-isolated scorer) the scorer's per-sample ``reward.timeout_s`` bounds a check.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic, Number, NumberSymbol, Set, Tuple

from rewards.base import RewardResult, RewardTimeout
from rewards.extract import (
    AnswerSegment,
    answer_segments,
    last_expression_segment,
    normalize_numerals,
    normalize_spacing,
    read_thousands,
)

_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_TRIVIAL = re.compile(r"[\s$]|\\text\{|\\mathrm\{|\}|\\left|\\right|\\!|\.$")
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
CPU_LIMIT_S = 5.0  # CPU seconds one check may use (parsing the reference and the answers, and verifying)
_MAX_SEGMENTS = 3  # marked answers tried, best first, until one parses
NO_MARKER = (
    "math: no answer marker (\\boxed{}, <answer>, ####, 'Final answer:', 'The answer is') "
    "and strict_format is on"
)


class _NoTimeoutNotice(logging.Filter):
    """math-verify warns on every call made with timeout=None; we bound time ourselves (_cpu_budget)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


class _OutOfCPU(BaseException):
    """Raised by the CPU-time alarm. A BaseException: math-verify and sympy catch Exception (and
    math-verify its own TimeoutException) and would turn it into "could not be parsed"."""


@contextmanager
def _cpu_budget(seconds: float) -> Iterator[list[bool]]:
    """Raises _OutOfCPU in the body once this process has used ``seconds`` more CPU time (ITIMER_PROF:
    user + system time, which load does not stretch), then every 50 ms of CPU until the body ends, in
    case something swallows it; the yielded flag says whether it fired. Off the main thread, where no
    signal can be handled, it does nothing."""
    fired = [False]
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield fired
        return

    def alarm(signum: int, frame: object) -> None:
        fired[0] = True
        raise _OutOfCPU

    previous = signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.05)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _parse(text: str) -> list:
    return parse(text, extraction_config=_CONFIG, parsing_timeout=None)  # type: ignore[arg-type]


def _parsed(result: list) -> bool:
    """math-verify appends the matched string as a fallback; only a non-string means it parsed."""
    return any(not isinstance(r, str) for r in result)


def _parse_either(text: str, bare: str, text_first: bool) -> list:
    """Parse ``text`` as math-verify extracts from prose, or ``bare`` wrapped as inline LaTeX; the first
    reading that parses wins, the other is the fallback."""
    readings = [text, f"${bare}$"] if text_first else [f"${bare}$", text]
    first: list = []
    for i, reading in enumerate(readings):
        if not reading.strip("$ "):
            continue
        result = _parse(reading)
        if _parsed(result):
            return result
        if i == 0:
            first = result
    return first


def _reference_kind(gold: list) -> str:
    """How the reference reads (see rewards.extract.normalize_numerals): "number", "list" or "other"."""
    value = next((g for g in gold if not isinstance(g, str)), None)
    if isinstance(value, (Number, NumberSymbol)):
        return "number"
    if isinstance(value, (Set, Tuple, tuple, list)):
        return "list"
    if isinstance(value, Basic) and value.is_number and value.is_real and not value.free_symbols:
        return "number"  # 2\\sqrt{2}, \\frac{\\pi}{3}
    return "other"


def _reference(reference: str) -> list:
    ref = read_thousands(normalize_spacing(reference.strip()))
    return _parse_either(ref, ref, text_first=bool(_DELIMITED.search(ref)))


def _read_answer(segment: AnswerSegment, kind: str) -> list:
    text = normalize_numerals(normalize_spacing(segment.text), kind)
    bare = normalize_numerals(normalize_spacing(segment.answer), kind) if segment.latex else ""
    return _parse_either(text, bare, text_first=segment.delimited)


def check(completion: str, reference: str, *, strict_format: bool = True) -> RewardResult:
    """Score with a reason: 1.0 when the completion's final answer equals ``reference``.

    The answer is the best marked segment (:func:`rewards.extract.answer_segments`) that math-verify can
    parse; the next one is tried only when it cannot. ``strict_format``: a completion with no answer marker
    scores 0 (the reason names the markers); off, the last math expression of the completion is scored.
    Raises :class:`rewards.base.RewardTimeout` when the check needs more than ``CPU_LIMIT_S`` of CPU time.
    """
    try:
        with _cpu_budget(CPU_LIMIT_S) as fired:
            result = _check(completion, reference, strict_format)
        if fired[0]:
            raise _OutOfCPU  # the alarm went off and something swallowed it: the result is not to be trusted
    except _OutOfCPU:
        raise RewardTimeout(
            f"math: checking the answer took more than {CPU_LIMIT_S:g} s of CPU time"
        ) from None
    return result


def _check(completion: str, reference: str, strict_format: bool) -> RewardResult:
    if not isinstance(completion, str) or not isinstance(reference, (str, int, float)):
        return RewardResult(
            0.0, f"math: bad input types {type(completion).__name__}/{type(reference).__name__}"
        )
    segments = answer_segments(completion)[:_MAX_SEGMENTS]
    if not segments:
        if strict_format:
            return RewardResult(0.0, NO_MARKER)
        last = last_expression_segment(completion)
        if last is None:
            return RewardResult(0.0, "math: empty completion")
        segments = [last]
    reference = str(reference)
    gold_spaced = normalize_spacing(reference.strip())
    best = segments[0]
    pred_spaced = normalize_spacing(best.answer)
    if pred_spaced and _TRIVIAL.sub("", pred_spaced) == _TRIVIAL.sub("", gold_spaced):
        return RewardResult(1.0)
    gold = _reference(reference)
    if not gold:
        return RewardResult(0.0, f"math: reference {reference[:60]!r} could not be parsed")
    kind = _reference_kind(gold)
    pred = _read_answer(best, kind)
    for segment in segments[1:]:
        if _parsed(pred):
            break
        later = _read_answer(segment, kind)
        if _parsed(later):
            best, pred = segment, later
    if not pred:
        return RewardResult(0.0, f"math: answer after {best.marker!r} could not be parsed")
    if verify(gold, pred, timeout_seconds=None):  # type: ignore[arg-type]
        return RewardResult(1.0)
    return RewardResult(0.0, "math: wrong answer")


def score(completion: str, reference: str, *, strict_format: bool = True) -> float:
    """1.0 if the final answer in ``completion`` (trailing ``\\boxed{}`` answers, ``<answer>``, ``#### x``,
    "Final answer: x", "the answer is x") equals ``reference``; see :func:`check` for ``strict_format`` and
    the CPU-time limit (RewardTimeout)."""
    return check(completion, reference, strict_format=strict_format).score
