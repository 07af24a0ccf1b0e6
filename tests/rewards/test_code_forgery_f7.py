"""F7 of the threat model: the test process never imports a name the solution chose, and never runs with a
writable cwd or ``sys.path`` entry. One test per attack, on every backend that runs here (bwrap, Docker,
``unsafe_subprocess``).

Each solution is wrong (it defines no ``add`` at all) and binds the tested name to a module object named
``unittest.__main__``. Before F7 the test process imported that name itself: ``unittest.main()`` ran
discovery in the writable work dir (its cwd), put that dir on ``sys.path`` and imported a ``test_*.py`` the
solution had written there, inside the test process. Each scored 1.0.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from rewards.code import check
from sandboxes import Sandbox, SandboxError, get_sandbox
from tests.sandboxes.conftest import TEST_LABEL, containers_left

ASSERT_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
HUMANEVAL_TESTS = (
    "METADATA = {}\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n    assert candidate(7, 7) == 14\n\ncheck(add)\n"
)

# The module the test process imports when it trusts the solution's name for it.
_PLANT = """
import os, types
open("test_planted.py", "w").write({payload!r})
add = types.ModuleType("unittest.__main__")
"""

# Runs inside the test process (imported by unittest's discovery): the pass line is a local of a frame
# above, so write it to stdout and leave with status 0.
_FRAMES_PAYLOAD = """
import os, sys
f = sys._getframe()
while f is not None:
    for v in list(f.f_locals.values()):
        if isinstance(v, str) and v.startswith("CISPO-TESTS-PASSED-"):
            os.write(1, ("\\n" + v + "\\n").encode())
            os._exit(0)
    f = f.f_back
"""

# Runs inside the test process: import_module returns what sys.modules holds after the module ran, so the
# tests get this always-equal callable as `add`; sys.exit is disarmed so unittest.main() returns.
_ALWAYS_EQUAL_PAYLOAD = """
import sys
class _Yes:
    def __call__(self, *a, **k):
        return self
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
sys.exit = lambda *a, **k: None
sys.modules["unittest.__main__"] = _Yes()
"""

ATTACKS = {
    "unittest_main_reads_pass_line_from_frames": (_FRAMES_PAYLOAD, ASSERT_TESTS),
    "unittest_main_always_equal_assert_style": (_ALWAYS_EQUAL_PAYLOAD, ASSERT_TESTS),
    "unittest_main_always_equal_humaneval_style": (_ALWAYS_EQUAL_PAYLOAD, HUMANEVAL_TESTS),
}


def attack(name: str) -> tuple[str, str]:
    """The completion and the tests of one attack."""
    payload, tests = ATTACKS[name]
    return "```python\n" + _PLANT.format(payload=payload) + "```", tests


@pytest.fixture(scope="module", params=["bwrap", "docker", "unsafe_subprocess"])
def backend(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    if request.param == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    kwargs = {"docker": {"labels": dict([TEST_LABEL])}, "unsafe_subprocess": {"allow_unsafe": True}}
    try:
        box = get_sandbox(request.param, **kwargs.get(request.param, {}))
    except SandboxError as e:
        pytest.skip(f"{request.param} cannot run here: {e}")
    yield box
    if request.param == "docker":
        assert containers_left(box) == [], "stray containers after the test"
    box.close()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_f7_a_module_name_the_solution_chose_is_never_imported_by_the_tests(
    name: str, backend: Sandbox
) -> None:
    completion, tests = attack(name)
    r = check(completion, tests, sandbox=backend, timeout_s=20.0)
    assert r.score == 0.0, r


def test_f7_the_honest_twin_passes_on_every_backend(backend: Sandbox) -> None:
    # The same planted file and module, and a correct add: only the forgery above is refused.
    completion = (
        "```python\n" + _PLANT.format(payload=_FRAMES_PAYLOAD) + "def add(a, b):\n    return a + b\n```"
    )
    for tests in (ASSERT_TESTS, HUMANEVAL_TESTS):
        r = check(completion, tests, sandbox=backend, timeout_s=20.0)
        assert r.score == 1.0, r


# Trusted tests that look at the process they run in: its cwd and sys.path hold nothing the solution wrote
# or could write (as root, only unsafe_subprocess runs so, everything is writable: there only the paths).
WHERE_THE_TESTS_RUN = """
import os, sys
assert os.getcwd() == "/", os.getcwd()
assert not [p for p in sys.path if p.startswith(({work!r}, "/tmp")) or not os.path.exists(p)], sys.path
if os.geteuid() != 0:
    assert not os.access(os.getcwd(), os.W_OK)
    assert not [p for p in sys.path if os.access(p, os.W_OK)], sys.path
assert add(2, 3) == 5
"""


def test_f7_the_tests_run_with_no_writable_cwd_or_path_entry(backend: Sandbox) -> None:
    completion = (
        "```python\nimport os\nos.makedirs('pkg', exist_ok=True)\ndef add(a, b):\n    return a + b\n```"
    )
    work = "/tmp/cispo-unsafe-" if backend.name == "unsafe_subprocess" else "/work"  # the solution's cwd
    r = check(completion, WHERE_THE_TESTS_RUN.format(work=work), sandbox=backend, timeout_s=20.0)
    assert r.score == 1.0, r
