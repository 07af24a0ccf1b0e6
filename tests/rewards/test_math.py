from __future__ import annotations

import inspect
import threading
import time

import pytest

from rewards.extract import final_answer, normalize_spacing
from rewards.math import check, score


def test_public_signature() -> None:
    assert list(inspect.signature(score).parameters) == ["completion", "reference"]


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42", 1.0),
        ("first \\boxed{41}, then corrected: \\boxed{42}", "42", 1.0),
        ("first \\boxed{42}, then corrected: \\boxed{41}", "42", 0.0),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "0.5", 1.0),
        ("Final Answer: 12", "12", 1.0),
        ("\\boxed{1\\,000}", "1000", 1.0),
        ("\\boxed{1{,}000}", "1000", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
        ("\\boxed{43}", "42", 0.0),
        ("I think it is probably 42 but I'm not sure", "42", 0.0),
        ("", "1", 0.0),
    ],
)
def test_answers(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


def test_no_answer_reason() -> None:
    assert check("no answer here", "3").reason == "math: no final answer found"


@pytest.mark.parametrize(
    "completion",
    [
        "a" * 2_000_000,
        "\\boxed{" * 200_000,
        "\\boxed{" + "1" * 1_000_000 + "}",
        "{" * 500_000 + "#### " + "}" * 500_000,
        "\\boxed{\\frac{" * 50_000,
    ],
    ids=["2MB-text", "unclosed-boxes", "huge-box", "braces", "nested-frac"],
)
def test_pathological_input_is_zero_and_fast(completion: str) -> None:
    start = time.monotonic()
    assert score(completion, "1") == 0.0
    assert time.monotonic() - start < 1.0


def test_megabyte_prefix_then_answer() -> None:
    assert score("x" * 1_000_000 + " so \\boxed{7}", "7") == 1.0


def test_works_off_the_main_thread() -> None:
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(score("\\boxed{\\frac{2}{4}}", "1/2")))
    t.start()
    t.join(10)
    assert out == [1.0]


def test_extraction_helpers() -> None:
    assert final_answer("blah \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert final_answer("#### 1,234") == "1,234"
    assert final_answer("nothing") is None
    assert normalize_spacing("1\\,234\\,567") == "1234567"
