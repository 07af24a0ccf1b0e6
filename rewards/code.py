"""Code rewards: run the model's program in a sandbox against assert-style tests or stdin/stdout cases.

``score``/``check``: the sandbox runs ``rewards/code_harness.py``. The tests run in a process of their own;
the solution runs in a second process, forked before any secret arrived, that they reach through a pipe, and
what crosses back is plain data (or a handle that equals only itself). The scorer generates a random pass
line per run and sends it on stdin; only the test process knows it, and it writes it only after the tests
returned normally and the solution process kept to the protocol. So ``sys.exit(0)``, ``os._exit(0)``,
killing the harness, rebinding builtins, reading frames or ``/proc/*/mem``, always-equal return values and
modules named to run code in the test process all score 0: the threat model's "the solution forges a
pass" (F1-F7 in ``sandboxes``) says what is and is not covered. Correct code scores 1.0 in the common
styles (unittest and pytest-style tests, a main block or ``sys.exit(0)`` in the solution, callables passed
to it, ``isinstance`` and dataclass equality, numpy: ``tests/rewards/test_code_fidelity.py``); the
sandbox runs ``reward.code.python`` (:func:`sandbox_python`).

``check_io``: the program's stdout is compared by the scorer, so the expected output never enters the
sandbox; lines are split on ``\\n`` and only ASCII whitespace is ignored at their ends.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import warnings
from pathlib import Path
from typing import Any

from rewards.base import RewardResult
from rewards.code_harness import PASS_PREFIX
from sandboxes import Limits, RunResult, Sandbox, SandboxError, get_sandbox

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", ""}
_lock = threading.Lock()
_default: Sandbox | None = None
SANDBOX_ENV = "CISPO_SANDBOX"
PYTHON_ENV = "CISPO_SANDBOX_PYTHON"
SANDBOX_VENV = Path(__file__).resolve().parents[1] / ".venv-sandbox"  # built by launch/setup_env.sh
SYSTEM_PYTHON = "/usr/bin/python3"
HOST_PYTHON_BACKENDS = ("bwrap", "unsafe_subprocess")  # they run an interpreter of this machine
_warned: list[bool] = []
HARNESS_PARTS = ("code_protocol.py", "code_runner.py", "code_solution.py", "code_harness.py")


def harness_source() -> str:
    """The sandbox program: the harness's files as one module, in order, without their imports of each
    other (``from rewards.`` statements, which only the scorer can resolve)."""
    lines: list[str] = []
    for name in HARNESS_PARTS:
        skipping = False
        for line in Path(__file__).with_name(name).read_text(encoding="utf-8").splitlines():
            if line.startswith("from rewards."):
                skipping = line.rstrip().endswith("(")
                continue
            if skipping:
                skipping = not line.startswith(")")
                continue
            lines.append(line)
    return "\n".join(lines) + "\n"


HARNESS = harness_source()
_ASCII_WS = " \t\r\n\f\v"


def sandbox_python(setting: str = "auto") -> str:
    """The interpreter a sandbox of this machine runs (``reward.code.python``): a path, or ``auto``:
    ``$CISPO_SANDBOX_PYTHON``, else the set-up script's environment (``.venv-sandbox``: numpy, scipy,
    sympy, pytest), else ``/usr/bin/python3`` with a warning that those packages are missing."""
    if setting != "auto":
        if not os.path.isfile(setting):
            raise SandboxError(
                f"reward.code.python: the interpreter {setting!r} does not exist (`bash launch/setup_env.sh` "
                f"builds the default one, {SANDBOX_VENV / 'bin' / 'python3'})"
            )
        return setting
    if os.environ.get(PYTHON_ENV):
        return sandbox_python(os.environ[PYTHON_ENV])
    venv = SANDBOX_VENV / "bin" / "python3"
    if venv.is_file():
        return str(venv)
    if not _warned:
        _warned.append(True)
        warnings.warn(
            f"reward.code.python=auto: {venv} is missing (`bash launch/setup_env.sh` builds it); the code "
            "sandbox runs /usr/bin/python3, without numpy, scipy, sympy or pytest",
            stacklevel=2,
        )
    return SYSTEM_PYTHON


def make_sandbox(name: str, python: str = "auto") -> Sandbox:
    """The backend ``name``; one that runs this machine's interpreter gets ``python`` (see sandbox_python).
    Docker's interpreter is the one in its image (launch/docker_engine.sh puts the same packages there)."""
    if name in HOST_PYTHON_BACKENDS:
        return get_sandbox(name, python=sandbox_python(python))
    return get_sandbox(name)


def default_sandbox() -> Sandbox:
    """Process-wide sandbox, built once from ``$CISPO_SANDBOX`` (default ``bwrap``) and ``python=auto``."""
    global _default
    with _lock:
        if _default is None:
            _default = make_sandbox(os.environ.get(SANDBOX_ENV, "bwrap"))
        return _default


def extract_code(completion: str) -> str:
    """The last fenced Python block (an unclosed final fence counts), else the raw completion."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for lang, body in blocks if lang in _PY_TAGS]
    if python:
        return python[-1]
    return completion if not blocks else blocks[-1][1]


def _is_utf8_text(text: str) -> bool:
    """False for lone surrogates: no UTF-8 file, hence no Python program, can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def harness_job(solution: str, tests: str, pass_line: str) -> str:
    """The harness's stdin: ASCII JSON (lone surrogates escaped, so encoding it never raises)."""
    return json.dumps({"pass": pass_line, "solution": solution, "tests": tests})


def _failure(run: RunResult) -> str:
    if run.killed_reason:
        return f"code: {run.killed_reason}"
    last = run.stderr.strip().splitlines()[-1:] or ["no traceback"]
    return f"code: exit {run.exit_code}: {last[0][:120]}"


def check(
    completion: str,
    tests: str,
    *,
    sandbox: Sandbox | None = None,
    timeout_s: float = 10.0,
    limits: Limits | None = None,
) -> RewardResult:
    """Like :func:`score` with the reason: timeout, exit code and last traceback line, or early exit."""
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError("code reward: the reference must be the tests' Python source (a non-empty str)")
    solution = extract_code(completion)
    if not solution.strip():
        return RewardResult(0.0, "code: empty program")
    if not _is_utf8_text(solution):
        return RewardResult(0.0, "code: the program is not valid UTF-8 text (lone surrogate)")
    pass_line = PASS_PREFIX + secrets.token_hex(16)
    run = (sandbox or default_sandbox()).run(
        HARNESS, stdin=harness_job(solution, tests, pass_line), timeout_s=timeout_s, limits=limits
    )
    if run.ok and f"\n{pass_line}\n" in run.stdout:
        return RewardResult(1.0)
    if run.ok:
        return RewardResult(0.0, "code: exited before the tests finished")
    return RewardResult(0.0, _failure(run))


def score(completion: str, tests: str) -> float:
    """1.0 only if the completion's last Python block, followed by ``tests``, runs the tests to their end."""
    return check(completion, tests).score


def _cases(reference: Any) -> list[tuple[str, str]]:
    ref = json.loads(reference) if isinstance(reference, str) else reference
    if isinstance(ref, dict) and "inputs" in ref and "outputs" in ref:
        ref = [{"input": i, "output": o} for i, o in zip(ref["inputs"], ref["outputs"])]
    if not isinstance(ref, list) or not ref or not all(isinstance(c, dict) and "input" in c for c in ref):
        raise ValueError(
            "code_io reward: reference must be [{'input': str, 'output': str}, ...] "
            "or {'inputs': [...], 'outputs': [...]} (or its JSON)"
        )
    return [(_text(c["input"]), _text(c["output"])) for c in ref]


def _text(value: Any) -> str:
    """A case's text with any lone surrogate made '?', so it can be sent and compared."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _lines(text: str) -> list[str]:
    return [line.rstrip(_ASCII_WS) for line in text.strip(_ASCII_WS).split("\n")]


def _same_output(got: str, want: str) -> bool:
    """Line by line, split on \\n only, ASCII whitespace ignored at line ends and around the whole output."""
    return _lines(got) == _lines(want)


def check_io(
    completion: str,
    cases: Any,
    *,
    sandbox: Sandbox | None = None,
    timeout_s: float = 5.0,
    partial: bool = False,
    limits: Limits | None = None,
) -> RewardResult:
    """Competitive-programming style: stdin in, stdout compared line by line (trailing spaces ignored).

    All-or-nothing by default (stops at the first failing case); ``partial=True`` gives the passed fraction.
    """
    pairs = _cases(cases)
    program = extract_code(completion)
    if not program.strip():
        return RewardResult(0.0, "code_io: empty program")
    if not _is_utf8_text(program):
        return RewardResult(0.0, "code_io: the program is not valid UTF-8 text (lone surrogate)")
    box = sandbox or default_sandbox()
    passed, first_failure = 0, ""
    for i, (stdin, want) in enumerate(pairs):
        run = box.run(program, stdin=stdin, timeout_s=timeout_s, limits=limits)
        if run.ok and _same_output(run.stdout, want):
            passed += 1
            continue
        first_failure = first_failure or f"code_io: case {i}: " + (
            "wrong output" if run.ok else _failure(run).removeprefix("code: ")
        )
        if not partial:
            break
    return RewardResult(passed / len(pairs) if partial else float(passed == len(pairs)), first_failure)
