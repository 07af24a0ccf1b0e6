"""Code rewards: run the model's program in a sandbox against assert-style tests or stdin/stdout cases.

``score`` passes only when the tests ran to their end: the harness writes a random marker after the last
test, so ``sys.exit(0)`` or ``os._exit(0)`` before or during the tests scores 0. The marker never touches
disk, argv or the environment (see the threat model in ``sandboxes``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from typing import Any

from rewards.base import RewardResult
from sandboxes import Limits, RunResult, Sandbox, get_sandbox

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", ""}
_lock = threading.Lock()
_default: Sandbox | None = None
SANDBOX_ENV = "CISPO_SANDBOX"


def default_sandbox() -> Sandbox:
    """Process-wide sandbox, built once from ``$CISPO_SANDBOX`` (default ``bwrap``)."""
    global _default
    with _lock:
        if _default is None:
            _default = get_sandbox(os.environ.get(SANDBOX_ENV, "bwrap"))
        return _default


def extract_code(completion: str) -> str:
    """The last fenced Python block (an unclosed final fence counts), else the raw completion."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for lang, body in blocks if lang in _PY_TAGS]
    if python:
        return python[-1]
    return completion if not blocks else blocks[-1][1]


def build_program(solution: str, tests: str, marker: str) -> str:
    """Solution then tests in one namespace (HumanEval style), then the marker; the file deletes itself."""
    return (
        "import os as _cispo_os, sys as _cispo_sys\n"
        "try:\n    _cispo_os.unlink(__file__)\nexcept OSError:\n    pass\n"
        "_cispo_ns = {'__name__': '__main__', '__builtins__': __builtins__}\n"
        f"exec(compile({solution!r}, '<solution>', 'exec'), _cispo_ns)\n"
        f"exec(compile({tests!r}, '<tests>', 'exec'), _cispo_ns)\n"
        "_cispo_sys.stdout.flush()\n"
        f"_cispo_os.write(1, b'\\n' + {marker.encode()!r} + b'\\n')\n"
    )


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
    marker = "CISPO-TESTS-PASSED-" + secrets.token_hex(16)
    run = (sandbox or default_sandbox()).run(
        build_program(solution, tests, marker), timeout_s=timeout_s, limits=limits
    )
    if run.ok and marker in run.stdout:
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
    return [(str(c["input"]), str(c["output"])) for c in ref]


def _same_output(got: str, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(want)


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
