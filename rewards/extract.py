"""Pull the final answer out of a completion the way models write it.

Everything here is linear in the input and caps what it returns, so megabyte completions and unbalanced
braces cost milliseconds and never reach the (slow, sympy-based) verifier.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_FINAL = re.compile(
    r"(?:the\s+)?final\s+answer\s*(?:is|:)\s*:?\s*([^\n]+)|(?:^|\n)\s*answer\s*:\s*([^\n]+)", re.IGNORECASE
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# LaTeX spacing inside numbers and expressions: "1\,000", "1\ 000", "1{,}000", "\!".
_LATEX_SPACES = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_BRACED_COMMA = re.compile(r"\{,\}")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")


def _boxed_starts(text: str, tries: int = 3) -> list[int]:
    """Where the content of the last few ``\\boxed{`` begins; rfind keeps this cheap on huge inputs."""
    starts, end = [], len(text)
    for _ in range(4 * tries):  # also bounded when "\\boxed" is never followed by a brace
        if len(starts) == tries:
            break
        pos = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if pos < 0:
            break
        m = _BOXED.match(text, pos)
        if m:
            starts.append(m.end())
        end = pos
    return starts


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if absent, unbalanced or too long."""
    # Only the last few: a string of 10^5 unclosed "\\boxed{" must not cost 10^5 scans.
    for start in _boxed_starts(text):
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
                    return text[start:i]
            i += 1
    return None


def _clean_sentence(ans: str) -> str:
    ans = ans.strip()
    ans = re.split(r"\.\s+I hope|\s+I hope", ans, maxsplit=1)[0]
    return ans.strip().rstrip(".").strip().strip("$").strip()


def final_answer(text: str) -> str | None:
    """The final answer: last ``\\boxed{}``, else ``#### x``, else "the final answer is x"; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tail = text[-20_000:]  # the answer is at the end; bounded regex work on megabyte inputs
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


def normalize_spacing(ans: str) -> str:
    """Drop LaTeX spacing and thousands separators so ``1\\,000``, ``1{,}000`` and ``1,000`` read 1000."""
    ans = _LATEX_SPACES.sub("", ans)
    ans = _BRACED_COMMA.sub("", ans)
    return _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), ans)
