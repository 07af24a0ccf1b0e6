"""Fidelity of the code reward: correct programs in the common styles score 1.0, their wrong twins 0.0.

Each row of ``STYLES`` is a style of solution or of tests, a correct program, a wrong twin that differs
only in being wrong, and the tests. The first three rows are the styles that already worked; on the harness
before the fidelity work every other row failed: its correct program scored 0 (run as ``__main__``, a
``sys.exit(0)`` voided it, callables could not be passed, isinstance and dataclass equality failed, numpy
was missing from the sandbox) or its wrong twin scored 1 (``TestCase`` and pytest-style tests were never
run). Rows with ``needs`` run where the sandbox's interpreter has those packages (the set-up script's
``.venv-sandbox`` does). The last tests show that the new ways in (callables the tests pass, dataclass
equality, the exit rules) give a wrong solution no 1.0.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from rewards.code import check, default_sandbox

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@dataclass(frozen=True)
class Style:
    name: str
    correct: str
    wrong: str
    tests: str
    needs: tuple[str, ...] = ()


ADD = "def add(a, b):\n    return a + b\n"
ADD_WRONG = "def add(a, b):\n    return a - b\n"
ASSERTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
UNITTEST = (
    "import unittest\n\nclass TestAdd(unittest.TestCase):\n    def test_small(self):\n"
    "        self.assertEqual(add(2, 3), 5)\n\n    def test_negative(self):\n"
    "        self.assertEqual(add(-1, 1), 0)\n"
)
SHAPES = (
    "import math\nclass Shape:\n    pass\n\nclass Circle(Shape):\n    def __init__(self, r):\n"
    "        self.r = r\n\n    def area(self):\n        return math.pi * self.r ** 2\n\n"
    "class Square(Shape):\n    def __init__(self, s):\n        self.s = s\n\n"
    "def make_shape(kind, size):\n    return ({KIND})(size)\n"
)
POINT = (
    "from dataclasses import dataclass\n\n@dataclass\nclass Point:\n    x: int\n    y: int\n\n"
    "def parse_point(text):\n    a, b = text.split(',')\n    return Point(int({A}), int({B}))\n"
)
NORMALISE = (
    "import numpy as np\n\ndef normalise(xs):\n"
    "    a = np.asarray(xs, dtype=float)\n    return a / {DIVISOR}\n"
)

STYLES = [
    Style("assert_style", ADD, ADD_WRONG, ASSERTS),
    Style(
        "humaneval_check_candidate",
        ADD,
        ADD_WRONG,
        "def check(candidate):\n    assert candidate(2, 3) == 5\n"
        "    assert candidate(0, 0) == 0\n\ncheck(add)\n",
    ),
    Style(
        "tests_call_their_own_test_helper",
        ADD,
        ADD_WRONG,
        "def test_case(a, b, want):\n    assert add(a, b) == want\n\n"
        "test_case(2, 3, 5)\ntest_case(-1, 1, 0)\n",
    ),
    Style(
        "solution_main_block_runs_unittest",
        "import unittest\n" + ADD + "\nif __name__ == '__main__':\n    unittest.main()\n",
        "import unittest\n" + ADD_WRONG + "\nif __name__ == '__main__':\n    unittest.main()\n",
        ASSERTS,
    ),
    Style(
        "solution_ends_with_sys_exit_0",
        "import sys\n" + ADD + "sys.exit(0)\n",
        "import sys\n" + ADD_WRONG + "sys.exit(0)\n",
        ASSERTS,
    ),
    Style("unittest_testcase_without_main", ADD, ADD_WRONG, UNITTEST),
    Style(
        "unittest_testcase_with_main",
        ADD,
        ADD_WRONG,
        UNITTEST + "\nif __name__ == '__main__':\n    unittest.main()\n",
    ),
    Style(
        "pytest_functions_and_class",
        ADD,
        ADD_WRONG,
        "def test_small():\n    assert add(2, 3) == 5\n\nclass TestMore:\n    def test_negative(self):\n"
        "        assert add(-1, 1) == 0\n",
    ),
    Style(
        "pytest_parametrize_and_raises",
        ADD + "def safe_div(a, b):\n    if b == 0:\n        raise ZeroDivisionError('b is 0')\n"
        "    return a / b\n",
        ADD + "def safe_div(a, b):\n    return a / b if b else 0\n",
        "import pytest\n\n@pytest.mark.parametrize('a, b, want', [(2, 3, 5), (-1, 1, 0), (10, 5, 15)])\n"
        "def test_add(a, b, want):\n    assert add(a, b) == want\n\n"
        "def test_div():\n    assert safe_div(6, 3) == pytest.approx(2.0)\n"
        "    with pytest.raises(ZeroDivisionError):\n        safe_div(1, 0)\n",
        needs=("pytest",),
    ),
    Style(
        "higher_order_callables",
        "def apply_twice(f, x):\n    return f(f(x))\n\n"
        "def sort_by(xs, key):\n    return sorted(xs, key=key)\n",
        "def apply_twice(f, x):\n    return f(x)\n\ndef sort_by(xs, key):\n    return sorted(xs)\n",
        "assert apply_twice(lambda x: x * 2, 3) == 12\nassert sort_by(['ccc', 'a', 'bb'], key=len) == "
        "['a', 'bb', 'ccc']\n\ndef neg(x):\n    return -x\n\nassert sort_by([1, 3, 2], neg) == [3, 2, 1]\n"
        "import math\nassert apply_twice(math.sqrt, 16) == 2\n"
        "assert sort_by(['b', 'A'], str.lower) == ['A', 'b']\n",
    ),
    Style(
        "isinstance_against_solution_classes",
        SHAPES.replace("{KIND}", "Circle if kind == 'circle' else Square"),
        SHAPES.replace("{KIND}", "Square if kind == 'circle' else Circle"),
        "c = make_shape('circle', 1)\nassert isinstance(c, Circle) and isinstance(c, Shape)\n"
        "assert not isinstance(c, Square) and isinstance(make_shape('square', 2), (Square, Circle))\n"
        "assert issubclass(Circle, Shape)\n",
    ),
    Style(
        "dataclass_equality",
        POINT.replace("{A}", "a").replace("{B}", "b"),
        POINT.replace("{A}", "b").replace("{B}", "a"),
        "assert parse_point('1,2') == Point(1, 2)\nassert parse_point('3,4') != Point(3, 5)\n",
    ),
    Style(
        "numpy_in_the_solution",
        NORMALISE.format(DIVISOR="a.sum()"),
        NORMALISE.format(DIVISOR="a.max()"),
        "import math\nout = normalise([1, 1, 2])\n"
        "assert all(math.isclose(x, y) for x, y in zip(out, [0.25, 0.25, 0.5]))\n",
        needs=("numpy",),
    ),
    Style(
        "numpy_in_the_tests",
        "def mean(xs):\n    return sum(xs) / len(xs)\n",
        "def mean(xs):\n    return sum(xs) / (len(xs) + 1)\n",
        "import numpy as np\nxs = [1.0, 2.0, 6.0]\nassert np.isclose(mean(xs), np.mean(xs))\n",
        needs=("numpy",),
    ),
]


def _has(module: str) -> bool:
    probe = f"```python\nimport {module}\ndef ok():\n    return 1\n```"
    return check(probe, "assert ok() == 1\n").score == 1.0


def _completion(program: str) -> str:
    return f"```python\n{program}```"


@pytest.mark.parametrize("style", STYLES, ids=[s.name for s in STYLES])
def test_correct_program_scores_one_and_its_wrong_twin_zero(style: Style) -> None:
    missing = [m for m in style.needs if not _has(m)]
    if missing:
        pytest.skip(f"the sandbox's interpreter ({default_sandbox().name}) lacks {missing}")
    good = check(_completion(style.correct), style.tests, timeout_s=20.0)
    assert good.score == 1.0, good
    bad = check(_completion(style.wrong), style.tests, timeout_s=20.0)
    assert bad.score == 0.0, bad


def test_the_table_covers_at_least_twelve_styles() -> None:
    assert len({s.name for s in STYLES}) >= 12


# --------------------------------------------------------------------------- the new surfaces stay shut

ADD_COMPLETION = _completion(ADD)
GUARDS = {
    # F4: equality between two objects of the solution is structural only for dataclasses, computed here
    "always_equal_class_vs_its_own_instance": (
        "class P:\n    def __init__(self, *a):\n        pass\n    def __eq__(self, o):\n        return True\n"
        "def parse_point(text):\n    return P()\nPoint = P\n",
        "assert parse_point('1,2') == Point(1, 2)\n",
    ),
    "dataclass_with_a_lying_eq_patched_in": (
        POINT.replace("{A}", "b").replace("{B}", "a") + "Point.__eq__ = lambda self, other: True\n",
        "assert parse_point('1,2') == Point(1, 2)\n",
    ),
    "dataclass_vs_a_plain_value": (
        POINT.replace("{A}", "b").replace("{B}", "a") + "def parse_point(text):\n    return Point(1, 2)\n"
        "Point.__eq__ = lambda self, other: True\n",
        "assert parse_point('1,2') == (1, 2)\n",
    ),
    # a callback the tests never passed, forged by id, breaks the protocol
    "forged_callback_id": (
        "import os\ndef apply(f, x):\n    for fd in os.listdir('/proc/self/fd'):\n        try:\n"
        '            os.write(int(fd), b\'["cb", 7, ["l", [1]], ["d", []]]\\n\')\n'
        "        except OSError:\n            pass\n    return f(x) + 1\n",
        "assert apply(lambda x: x + 1, 1) == 3\n",
    ),
    # the tests' builtins that would hand over the test process never cross
    "tests_pass_getattr": (
        "def apply(f, x):\n    return f(x, '__class__')\n",
        "assert apply(getattr, 1) is not None\n",
    ),
    "tests_pass_str_format": (  # "{0.__globals__}" would read the tests' objects by attribute
        "def apply(f, x):\n    return f('{0.__class__}', x)\n",
        "assert apply(str.format, 1) is not None\n",
    ),
    # exit rules: a failing exit at the top level, or any exit inside a call, still voids the run
    "sys_exit_1_at_top_level": ("import sys\n" + ADD + "sys.exit(1)\n", ASSERTS),
    "exit_inside_a_test_case": ("def add(a, b):\n    raise SystemExit(0)\n", UNITTEST),
    "solution_defines_the_collected_tests": (
        "import unittest\nclass TestAdd(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
        "def test_small():\n    pass\n" + ADD_WRONG,
        "def test_small():\n    assert add(2, 3) == 5\n",
    ),
    "fixtures_are_not_supported": (ADD, "def test_small(tmp_path):\n    assert add(2, 3) == 5\n"),
}


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_the_new_ways_in_give_no_pass(name: str) -> None:
    program, tests = GUARDS[name]
    r = check(_completion(program), tests, timeout_s=20.0)
    assert r.score == 0.0, r


def test_failure_reasons_name_the_collected_tests() -> None:
    r = check(_completion(ADD_WRONG), UNITTEST)
    assert r.score == 0.0 and "2 of 2 tests failed" in r.reason, r
    r = check(_completion(ADD), "def test_small(tmp_path):\n    assert add(2, 3) == 5\n")
    assert "fixtures are not supported" in r.reason, r
