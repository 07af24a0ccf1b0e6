"""``reward.code.python``: the interpreter the code sandbox runs; the environment the set-up script builds.

The default (``auto``) is ``.venv-sandbox``: a venv of the system Python with launch/sandbox-requirements.txt
(numpy, scipy, sympy, pytest), which bwrap binds read-only at ``/opt/cispo-python``.
"""

from __future__ import annotations

import shutil

import pytest

from cispo.driver.plan import compose_config
from rewards import RewardInput, get_reward
from rewards.code import SANDBOX_VENV, SYSTEM_PYTHON, make_sandbox, sandbox_python
from sandboxes import SandboxError

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
VENV_PYTHON = SANDBOX_VENV / "bin" / "python3"
needs_env = pytest.mark.skipif(
    not VENV_PYTHON.is_file(), reason="bash launch/setup_env.sh builds .venv-sandbox"
)

NUMPY_SOLUTION = "```python\nimport numpy as np\n\ndef total(xs):\n    return np.asarray(xs).sum()\n```"
NUMPY_TESTS = "assert total([1, 2, 3]) == 6\n"


def test_the_config_key_reaches_the_code_rewards_only() -> None:
    cfg = compose_config(["reward=code", f"reward.code.python={SYSTEM_PYTHON}"])
    assert cfg.reward.code.python == SYSTEM_PYTHON
    assert cfg.reward.code.kwargs_for("code", {"timeout_s": 3}) == {"python": SYSTEM_PYTHON, "timeout_s": 3}
    assert cfg.reward.code.kwargs_for("code_io", {"python": "/x"}) == {
        "python": "/x"
    }  # the reward's own wins
    assert cfg.reward.code.kwargs_for("math", {}) == {}
    assert compose_config(["reward=code"]).reward.code.python == "auto"
    with pytest.raises(ValueError, match="reward.code.python"):
        compose_config(["reward=code", "reward.code.python=' '"])


def test_a_missing_interpreter_is_a_clear_error() -> None:
    with pytest.raises(
        SandboxError, match=r"reward.code.python: the interpreter '/nope/python3' does not exist"
    ):
        sandbox_python("/nope/python3")
    code = get_reward("code", python="/nope/python3")
    with pytest.raises(SandboxError, match="setup_env.sh"):
        code(RewardInput("p", NUMPY_SOLUTION, reference=NUMPY_TESTS))


@needs_env
def test_the_interpreter_is_the_one_configured() -> None:
    assert sandbox_python("auto") == str(VENV_PYTHON)
    with_env = get_reward("code")(RewardInput("p", NUMPY_SOLUTION, reference=NUMPY_TESTS))
    assert with_env.score == 1.0, with_env
    system = get_reward("code", python=SYSTEM_PYTHON)(RewardInput("p", NUMPY_SOLUTION, reference=NUMPY_TESTS))
    assert system.score == 0.0 and "numpy" in system.reason, system
    io = get_reward("code_io", python=str(VENV_PYTHON))
    program = "```python\nimport scipy.special\nprint(int(scipy.special.comb(int(input()), 2)))\n```"
    assert io(RewardInput("p", program, reference='[{"input": "5", "output": "10"}]')).score == 1.0


@needs_env
def test_the_environment_is_read_only_in_bwrap() -> None:
    probe = (
        "import os, sys, numpy, scipy, sympy, pytest\nprint(sys.prefix)\n"
        "try:\n    open(os.path.join(numpy.__path__[0], 'owned.py'), 'w').write('x')\n    print('wrote')\n"
        "except OSError:\n    print('read-only')\n"
    )
    r = make_sandbox("bwrap").run(probe, timeout_s=30.0)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["/opt/cispo-python", "read-only"], r.stdout


@needs_env
def test_unsafe_subprocess_runs_the_same_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISPO_ALLOW_UNSAFE_SANDBOX", "1")
    r = make_sandbox("unsafe_subprocess").run("import sys, numpy, scipy\nprint(sys.prefix)\n", timeout_s=30.0)
    assert r.exit_code == 0 and r.stdout.strip() == str(SANDBOX_VENV), (r.stdout, r.stderr)
