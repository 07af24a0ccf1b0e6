from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewards.extract import final_answer, normalize_spacing
from rewards.math import check, score


def test_public_signature() -> None:
    params = inspect.signature(score).parameters
    assert list(params)[:2] == ["completion", "reference"]
    assert params["strict_format"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["strict_format"].default is True
    assert score("\\boxed{2}", "2") == 1.0  # still callable as score(completion, reference)


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
    reason = check("no answer here", "3").reason
    assert "no answer marker" in reason and "\\boxed{}" in reason and "strict_format" in reason


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
    # "Fast" without a clock: a check past its CPU budget (rewards.math.CPU_LIMIT_S) raises RewardTimeout,
    # so an input that blew the extraction up would fail here however busy the machine is.
    assert score(completion, "1") == 0.0


def test_megabyte_prefix_then_answer() -> None:
    assert score("x" * 1_000_000 + " so \\boxed{7}", "7") == 1.0


def test_works_off_the_main_thread() -> None:
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(score("\\boxed{\\frac{2}{4}}", "1/2")))
    t.start()
    t.join(10)
    assert out == [1.0]
    # every reading path (boxes, prose, decimal commas, last expression) works without SIGALRM
    jobs = [
        ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "(2, 2), (6, 2)", True),
        ("Final answer: therefore $x \\geq 5$ is the solution", "x \\geq 5", True),
        ("Final Answer: it took 3 hours.", "3", True),
        ("\\boxed{3,5}", "3.5", True),
        ("so it is $\\frac{1}{2}$", "0.5", False),
    ]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: score(j[0], j[1], strict_format=j[2]), jobs))
    assert got == [1.0] * len(jobs)


def test_extraction_helpers() -> None:
    assert final_answer("blah \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert final_answer("#### 1,234") == "1,234"
    assert final_answer("nothing") is None
    assert normalize_spacing("1\\,234\\,567") == "1234567"


# --- The classes of correct answers the verifier used to reject (each with a wrong twin that must stay 0) ---


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("Final answer: therefore $x \\geq 5$ is the solution", "x \\geq 5", 1.0),
        ("Final answer: therefore $x \\geq 6$ is the solution", "x \\geq 5", 0.0),
        ("Answer: the probability is $\\frac{3}{4}$, as computed above.", "0.75", 1.0),
        ("Answer: the probability is $\\frac{2}{3}$, as computed above.", "0.75", 0.0),
        ("So the final answer is the pair $(3, -1)$ that we found earlier.", "(3, -1)", 1.0),
        ("**Final Answer**\nThe train needs $2.5$ hours to arrive.", "5/2", 1.0),
        ("**Final Answer**\nThe train needs $3.5$ hours to arrive.", "5/2", 0.0),
    ],
)
def test_sentence_answers(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 2)}.", "(2, 2), (6, 2)", 1.0),
        ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 3)}.", "(2, 2), (6, 2)", 0.0),
        ("Only one: \\boxed{(2, 2)}.", "(2, 2), (6, 2)", 0.0),
        ("$x = \\boxed{-2}$ or $x = \\boxed{1}$.", "1, -2", 1.0),
        ("\\boxed{3}, \\boxed{5}, \\boxed{7}", "\\{3, 5, 7\\}", 1.0),
        ("\\[ \\boxed{3} \\quad \\text{and} \\quad \\boxed{5} \\]", "3, 5", 1.0),
        # prose between two boxes: the earlier one was a draft, only the last one counts
        ("I first guessed \\boxed{41}, but rechecking the sum gives \\boxed{42}", "42", 1.0),
    ],
)
def test_several_boxed_answers(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


_M = "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        (f"\\boxed{{{_M}}}", _M, 1.0),
        (f"\\boxed{{{_M.replace('4', '5')}}}", _M, 0.0),
        # the same matrix written with other spacing: only math-verify can tell, so "\\\\" must survive
        (f"\\boxed{{{_M}}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
        (f"\\boxed{{{_M}}}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", 0.0),
        (
            "so $\\boxed{\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}}$",
            "\\begin{pmatrix}3\\\\2\\\\-6\\end{pmatrix}",
            1.0,
        ),
        (
            "Final answer: $\\begin{bmatrix} 1 & 0 \\\\ 0 & 1 \\end{bmatrix}$",
            "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}",
            1.0,
        ),
    ],
)
def test_matrix_row_breaks(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


def test_spacing_normaliser_keeps_row_breaks() -> None:
    assert normalize_spacing("1 & 2 \\\\ 3 & 4") == "1 & 2 \\\\ 3 & 4"
    assert normalize_spacing("a\\\\ b\\ c\\,d") == "a\\\\ bcd"


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("Final Answer: The final answer is $14{,}916$", "14916", 1.0),
        ("Final Answer: The final answer is $14{,}916$. I hope it is correct.", "14916", 1.0),
        ("Final Answer: The final answer is $14 {, }916$. I hope it is correct.", "14916", 1.0),
        ("Final Answer: The final answer is $14{,}917$. I hope it is correct.", "14916", 0.0),
        ("\\boxed{14,916}", "14916", 1.0),
        ("\\boxed{14916}", "14{,}916", 1.0),
        ("#### 1,234,567", "1234567", 1.0),
        ("\\boxed{1\\,234\\,567}", "1,234,567", 1.0),
        # a list stays a list
        ("\\boxed{1,2,3}", "1, 2, 3", 1.0),
        ("\\boxed{1,2,3}", "123", 0.0),
        ("\\boxed{10,200}", "10, 200", 1.0),
        ("\\boxed{10, 200}", "10200", 0.0),
        # a decimal comma, read as such only against a single-value reference
        ("\\boxed{3,5}", "3.5", 1.0),
        ("\\boxed{3,5}", "3, 5", 1.0),
        ("Final answer: 1000,99", "1000.99", 1.0),
        ("\\boxed{0,5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{2{,}5}", "2.5", 1.0),  # a typeset comma is never a list: thousands or else decimal
        ("\\boxed{11,\\!111}", "11111", 1.0),
        # against a list, "1,000" is still a thousand: no list item is written "000"
        ("\\boxed{(1,000, 2)}", "(1000, 2)", 1.0),
        ("Final answer: 1,000", "1, 0", 0.0),
        # against an expression, math-verify's own reading
        ("\\boxed{x = 1,000}", "x = 1000", 1.0),
    ],
)
def test_separators(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("<think>2+2</think><answer>4</answer>", "4", 1.0),
        ("<answer>The sum is $4$.</answer>", "4", 1.0),
        ("Adding them up, the answer is $\\frac{7}{2}$.", "3.5", 1.0),
        ("Final answer:\n$$\n\\frac{7}{2}\n$$", "3.5", 1.0),
        ("Final answer: 2x+3", "3+2x", 1.0),  # no delimiters: read whole, not up to its first number
        ("Final answer: 1, 2, 3", "\\{1,2,3\\}", 1.0),
        ("So the answer is 5? No. Final answer: 6", "6", 1.0),
        # the answer written last counts; a marker with nothing parseable after it gives way to the next
        ("\\boxed{5}\n\nFinal Answer: The final answer is $6$. I hope it is correct.", "6", 1.0),
        ("\\boxed{7}\nSo the final answer: let me recheck it once more", "7", 1.0),
        ("Final Answer: Jane started growing it 3 hours ago.", "3", 1.0),
    ],
)
def test_markers(completion: str, reference: str, expected: float) -> None:
    assert score(completion, reference) == expected


def test_strict_format() -> None:
    for completion in ("so x is 5", "we get $4$ and then $x = 5$"):
        result = check(completion, "5")
        assert result.score == 0.0 and "no answer marker" in result.reason
        assert check(completion, "5", strict_format=False).score == 1.0
    # the last expression is the one scored
    assert score("we get $5$ and then $4$", "5", strict_format=False) == 0.0
    assert score("x" * 100_000 + "\nso it is $\\frac{1}{2}$", "0.5", strict_format=False) == 1.0
    # a marker still decides when there is one
    assert score("Final answer: 4\nCheck: $5$", "5", strict_format=False) == 0.0


def test_strict_format_from_config() -> None:
    from rewards.base import RewardInput
    from rewards.registry import get_reward

    sample = RewardInput("q", "so it is $7$", reference="7")
    assert get_reward("math")(sample).score == 0.0
    assert get_reward("math", strict_format=False)(sample).score == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "a" * 2_000_000,
        "\\boxed{" * 200_000,
        "{" * 500_000 + "#### " + "}" * 500_000,
        "\\boxed{\\frac{" * 50_000,
        "$" * 1_000_000,
        "\\boxed{1} and " * 100_000,
        "Final answer: " + "$1$ and " * 100_000,
        "Answer: " + "\\begin{pmatrix}" * 100_000,
    ],
    ids=[
        "2MB-text",
        "unclosed-boxes",
        "braces",
        "nested-frac",
        "dollars",
        "many-boxes",
        "long-final",
        "begins",
    ],
)
def test_pathological_input_is_fast_without_strict_format(completion: str) -> None:
    score(completion, "2")  # no RewardTimeout: each check stays within its CPU budget
    score(completion, "2", strict_format=False)
