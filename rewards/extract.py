"""Pull the final answer out of a completion the way models write it.

Everything here is linear in the input and caps what it returns, so megabyte completions and unbalanced
braces cost milliseconds and never reach the (slow, sympy-based) verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_ANSWER_CHARS = 1000
MAX_BOXED = 8  # trailing \boxed{} answers read together as one answer
_TAIL_CHARS = 20_000  # markers are looked for in the end of the completion only

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_FINAL = re.compile(
    r"(?:the\s+)?final\s+answer\s*(?:is|:)\s*:?\s*([^\n]+)|(?:^|\n)\s*answer\s*:\s*([^\n]+)", re.IGNORECASE
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

# Answer markers (see answer_segments): within one kind the last occurrence counts.
_MARK_FINAL = re.compile(
    r"(?:\bthe\s+)?\bfinal\s+answer\s*(?:\bis\b|:)\s*:?"  # "Final answer:", "The final answer is"
    r"|\*\*\s*final\s+answer\s*:?\s*\*\*\s*:?"  # "**Final Answer**"
    r"|(?:^|\n)[ \t>#*]*answer\s*\**\s*:",  # "Answer:" opening a line
    re.IGNORECASE,
)
_MARK_IS = re.compile(r"\b(?:the\s+)?answer\s+is\b\s*:?", re.IGNORECASE)  # "so the answer is $x$"
_MATH_DELIMITER = re.compile(r"\$|\\\(|\\\[")
_HOPE = re.compile(r"\.?\s*I hope it is correct", re.IGNORECASE)
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_MATH_WORDS = frozenset(
    "sqrt sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log exp and mod inf infty".split()
)
# What may stand between two \boxed{} that together form one answer: punctuation, math delimiters and
# spacing, "and"/"or", "x =". Anything else (prose) means the earlier box was a draft.
_CONNECTOR = re.compile(
    r"(?:\s|[,;.&$~]|\\[()\[\]]|\\\\|\\q?quad(?![a-zA-Z])|\\[,;:! ]"
    r"|\\(?:text|mathrm|textrm|mbox)\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b"
    r"|[a-zA-Z](?:_\{?\w+\}?)?\s*=)*",
    re.IGNORECASE,
)
_MAX_CONNECTOR = 70

# LaTeX spacing: "1\,000", "1\ 000", "\!", "\quad", "~". Group 1 is a row break "\\", always kept.
_LATEX_SPACES = re.compile(r"(\\\\)|\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
# "{,}" (also "{, }") and ",\!" / ",\," are how LaTeX typesets a comma inside a number (never a list).
_TYPESET_COMMA = re.compile(r"\s*(?:\{\s*,\s*\}|,\s*\\[!,])\s*")
_TYPESET_NUMERAL = re.compile(
    r"(?<![\w.,^])(?<![_^]\{)\d+(?:(?:\s*\{\s*,\s*\}\s*|,\s*\\[!,]\s*)\d+)+(?:\.\d+)?"
)
_BRACED_COMMA = re.compile(r"\{\s*,\s*\}")
_COMMA_NUMERAL = re.compile(r"(?<![\w.,^])(?<![_^]\{)\d+(?:,\d+)+(?:\.\d+)?(?![\w]|[.,]\d)")
_SPACE_NUMERAL = re.compile(r"(?<![\w.,^])(?<![_^]\{)[1-9]\d{0,2}(?: \d{3})+(?![\w]|[.,]\d)")


@dataclass(frozen=True)
class AnswerSegment:
    """Where the final answer is: ``text`` goes to math-verify as is (its own LaTeX and expression
    extraction applies); ``answer`` is the answer alone, markers and "$" stripped."""

    marker: str  # "boxed", "<answer>", "####", "final answer", "the answer is" or "last expression"
    text: str
    answer: str
    delimited: bool  # the answer holds its own math delimiters ($, \(, \[) or boxes
    position: int = 0  # where in the completion the marker starts
    latex: bool = True  # ``answer`` may also be read as LaTeX (not prose, which would read as symbols)


def _boxed_spans(text: str, end: int, tries: int = 3, lo: int = 0) -> list[tuple[int, int]]:
    """(command start, content start) of the last few ``\\boxed{`` in ``text[lo:end]``; rfind keeps this
    cheap."""
    spans: list[tuple[int, int]] = []
    for _ in range(4 * tries):  # also bounded when "\\boxed" is never followed by a brace
        if len(spans) == tries:
            break
        pos = max(text.rfind("\\boxed", lo, end), text.rfind("\\fbox", lo, end))
        if pos < 0:
            break
        m = _BOXED.match(text, pos)
        if m:
            spans.append((pos, m.end()))
        end = pos
    return spans


def _boxed_starts(text: str, tries: int = 3) -> list[int]:
    """Where the content of the last few ``\\boxed{`` begins."""
    return [start for _, start in _boxed_spans(text, len(text), tries)]


def _close(text: str, start: int) -> int | None:
    """Index of the brace closing the group whose content begins at ``start``; None past the length cap."""
    depth, i = 1, start
    limit = min(len(text), start + MAX_ANSWER_CHARS + 1)
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if absent, unbalanced or too long."""
    # Only the last few: a string of 10^5 unclosed "\\boxed{" must not cost 10^5 scans.
    for start in _boxed_starts(text):
        close = _close(text, start)
        if close is not None:
            return text[start:close]
    return None


def boxed_answers(text: str) -> list[str]:
    """The trailing ``\\boxed{}`` answers that together form the answer, in order; [] if there is none.

    "\\boxed{(2, 2)} and \\boxed{(6, 2)}" gives both; "\\boxed{41}, but rechecking gives \\boxed{42}" only
    the last, because prose between two boxes makes the earlier one a draft (see ``_CONNECTOR``).
    """
    last = None
    for cmd, start in _boxed_spans(text, len(text)):
        close = _close(text, start)
        if close is not None:
            last = (cmd, start, close)
            break
    if last is None:
        return []
    group = [text[last[1] : last[2]].strip()]
    cmd = last[0]
    for _ in range(2 * MAX_BOXED):  # repeats of one box do not grow the group but are bounded too
        if len(group) == MAX_BOXED:
            break
        # the previous box must end within _MAX_CONNECTOR of this one: look no further back than that
        lo = max(0, cmd - _MAX_CONNECTOR - MAX_ANSWER_CHARS - 16)
        spans = _boxed_spans(text, cmd, tries=1, lo=lo)
        if not spans:
            break
        prev_cmd, prev_start = spans[0]
        close = _close(text, prev_start)
        if close is None or close >= cmd:  # unbalanced, or a box around the later one
            break
        between = text[close + 1 : cmd]
        if len(between) > _MAX_CONNECTOR or not _CONNECTOR.fullmatch(between):
            break
        content = text[prev_start:close].strip()
        if content != group[0]:  # "\boxed{5} \boxed{5}" is one answer
            group.insert(0, content)
        cmd = prev_cmd
    return group


def _clean_sentence(ans: str) -> str:
    ans = ans.strip()
    ans = re.split(r"\.\s+I hope|\s+I hope", ans, maxsplit=1)[0]
    return ans.strip().rstrip(".").strip().strip("$").strip()


def final_answer(text: str) -> str | None:
    """The final answer: last ``\\boxed{}``, else ``#### x``, else "the final answer is x"; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tail = text[-_TAIL_CHARS:]  # the answer is at the end; bounded regex work on megabyte inputs
    for pattern in (_HASHES, _FINAL):
        found = None
        for found in pattern.finditer(tail):  # noqa: B007 - we want the last match
            pass
        if found is not None:
            ans = next(g for g in found.groups() if g is not None)
            ans = _clean_sentence(ans)
            if ans and len(ans) <= MAX_ANSWER_CHARS:
                return ans
    return None


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, or None."""
    found = None
    for found in _ANSWER_TAG.finditer(text[-50_000:]):  # noqa: B007 - we want the last match
        pass
    return found.group(1).strip() if found is not None else None


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - we want the last match
        pass
    return found


def _answer_after(text: str, start: int) -> str:
    """The answer written after a marker ending at ``start``: the rest of its line, or the next non-blank
    line when the marker ends its line, extended while a display environment ($$, \\[, \\begin) is open;
    cut before "I hope it is correct" and at MAX_ANSWER_CHARS."""
    window = text[start : start + MAX_ANSWER_CHARS]
    lead = len(window) - len(window.lstrip(" \t*:"))
    if window[lead : lead + 1] == "\n":
        lead = len(window) - len(window.lstrip())
    out: list[str] = []
    for line in window[lead:].split("\n"):
        out.append(line)
        body = "\n".join(out)
        balanced = (
            body.count("$$") % 2 == 0
            and body.count("\\[") <= body.count("\\]")
            and body.count("\\begin{") <= body.count("\\end{")
        )
        if balanced:
            break
    return _HOPE.split("\n".join(out), maxsplit=1)[0].strip()


def _has_words(answer: str) -> bool:
    """Prose around the answer ("3 hours ago", "28 percent"), not only math ("2x+3", "\\text{A}")."""
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(answer))


def _segment(marker: str, head: str, answer: str, position: int) -> AnswerSegment | None:
    if not answer:
        return None
    delimited = bool(_MATH_DELIMITER.search(answer))
    if not delimited and _has_words(answer):
        # prose without math delimiters: math-verify takes its last expression (the marker is left out,
        # since after "answer:" it would take the first number instead)
        bare = _clean_sentence(answer)
        return AnswerSegment(marker, answer, bare, True, position, latex=not any(c.isspace() for c in bare))
    return AnswerSegment(marker, f"{head} {answer}".strip(), _clean_sentence(answer), delimited, position)


def answer_segments(text: str) -> list[AnswerSegment]:
    """Candidate final-answer segments, best first; [] without an answer marker.

    The strong markers are the trailing ``\\boxed{}`` answers, the last ``<answer>...</answer>``, the last
    ``#### x`` and the last "Final answer: ..." / "The final answer is ..." / "**Final Answer**" / a line
    opening with "Answer:"; the one written last comes first (a model's last word on its answer). The
    weak marker "the answer is ..." is used only after them, or alone.
    """
    found: list[AnswerSegment] = []
    tail_start = max(0, len(text) - _TAIL_CHARS)
    tail = text[tail_start:]
    boxes = boxed_answers(text)
    if boxes and sum(len(b) for b in boxes) <= MAX_ANSWER_CHARS:
        joined = ", ".join(f"\\boxed{{{b}}}" for b in boxes)
        answer = ", ".join(boxes) if len(boxes) > 1 else boxes[0]
        position = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
        found.append(AnswerSegment("boxed", joined, answer, True, position))
    tag = _last(_ANSWER_TAG, tail)
    if tag is not None:
        seg = _segment("<answer>", "", tag.group(1).strip()[:MAX_ANSWER_CHARS], tail_start + tag.start())
        found += [seg] if seg else []
    hashes = _last(_HASHES, tail)
    if hashes is not None:
        seg = _segment("####", "", hashes.group(1).strip()[:MAX_ANSWER_CHARS], tail_start + hashes.start())
        found += [seg] if seg else []
    final = _last(_MARK_FINAL, tail)
    if final is not None:
        head = final.group(0).strip()
        seg = _segment("final answer", head, _answer_after(tail, final.end()), tail_start + final.start())
        found += [seg] if seg else []
    found.sort(key=lambda seg: -seg.position)
    weak = _last(_MARK_IS, tail)
    if weak is not None:
        seg = _segment("the answer is", weak.group(0).strip(), _answer_after(tail, weak.end()), 0)
        found += [seg] if seg else []
    return found


def last_expression_segment(text: str) -> AnswerSegment | None:
    """The end of a completion with no answer marker, for math-verify to take its last expression from."""
    tail = text[-MAX_ANSWER_CHARS:].strip()
    if len(text) > MAX_ANSWER_CHARS:  # start at a line (else word) boundary so "$" pairs stay paired
        cut = tail.find("\n")
        cut = cut if cut >= 0 else tail.find(" ")
        tail = tail[cut + 1 :].strip() if cut >= 0 else tail
    if not tail:
        return None
    return AnswerSegment("last expression", tail, _clean_sentence(tail), True, latex=False)


def normalize_spacing(ans: str) -> str:
    """Drop LaTeX spacing (``\\,``, ``\\!``, ``\\ ``, ``\\quad``, ``~``) and read typeset commas inside
    numbers, so ``1\\,000``, ``1{,}000`` and ``1,\\!000`` read 1000 and ``2{,}5`` reads 2.5 (a typeset comma
    is never a list separator: thousands when the grouping fits, else a decimal comma). A row break ``\\\\``
    is never touched."""
    ans = _TYPESET_NUMERAL.sub(
        lambda m: _read_comma_numeral(_TYPESET_COMMA.sub(",", m.group(0)), decimal=True), ans
    )
    ans = _LATEX_SPACES.sub(lambda m: m.group(1) or "", ans)
    return _BRACED_COMMA.sub(",", ans)


def _read_comma_numeral(numeral: str, decimal: bool) -> str:
    whole, dot, frac = numeral.partition(".")
    groups = whole.split(",")
    if groups[0][0] != "0" and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]):
        return "".join(groups) + dot + frac  # thousands separators: 14,916 / 1,000.5
    if decimal and len(groups) == 2 and not dot:
        return f"{groups[0]}.{groups[1]}"  # a decimal comma: 3,5 / 1000,99 / 0,111
    return numeral


def _list_numeral(numeral: str) -> str:
    whole, dot, frac = numeral.partition(".")
    groups = whole.split(",")
    if all(len(g) == 3 for g in groups[1:]) and any(g[0] == "0" for g in groups[1:]):
        return _read_comma_numeral(numeral, decimal=False)  # 1,000 / 2,050: no list item starts with 0
    return ", ".join(groups) + dot + frac


def read_thousands(text: str) -> str:
    """Bare commas in numerals with proper grouping (``7,425,000``) are thousands separators."""
    return _COMMA_NUMERAL.sub(lambda m: _read_comma_numeral(m.group(0), decimal=False), text)


def normalize_numerals(answer: str, reference_kind: str) -> str:
    """Read the bare commas (and spaces) inside the answer's numerals the way the reference is written.

    LaTeX-typeset commas (``14{,}916``, ``14,\\!916``, ``2{,}5``) and thin spaces (``14\\,916``) are read in
    ``normalize_spacing``, whatever the reference. A bare comma is ambiguous, so the reference decides:

    - ``reference_kind`` "number" (the reference is one number: "14916", "-3.5", "\\frac{1}{2}", "28\\%"): the
      answer cannot be a list, so ``14,916`` and ``14 916`` (1-3 digits, then groups of exactly 3, first
      digit not 0) are thousands separators and a lone comma otherwise is a decimal comma (``3,5``,
      ``1000,99``, ``0,111``); ``1,2,3`` stays as is;
    - "list" (the reference is a set, tuple, interval or several answers): a comma between digits
      separates items, so ``10,200`` becomes ``10, 200`` (math-verify alone would read 10200), unless an
      item would start with 0: ``1,000`` and ``2,050`` stay numbers (no one writes a list item "000");
    - "other" (an expression, an equation, a matrix): only proper thousands grouping is read, as in the
      reference (``x = 1,000`` is x = 1000; math-verify alone reads x = {1, 0}).

    The reference itself only gets that reading (``read_thousands``): a bare comma in it that is not a
    thousands separator is a list separator ("-2,1" is two roots), never a decimal comma.
    """
    if reference_kind == "list":
        return _COMMA_NUMERAL.sub(lambda m: _list_numeral(m.group(0)), answer)
    if reference_kind != "number":
        return read_thousands(answer)
    answer = _COMMA_NUMERAL.sub(lambda m: _read_comma_numeral(m.group(0), decimal=True), answer)
    return _SPACE_NUMERAL.sub(lambda m: m.group(0).replace(" ", ""), answer)
