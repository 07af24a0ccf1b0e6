"""``unsafe_subprocess``: a plain child process with rlimits and a scrubbed environment, no isolation.

For trusted code or machines where neither bwrap nor Docker exists. It refuses to start unless the caller
opts in explicitly, because model-written code run this way can read and write anything the user can,
reach the network, and (as root) ignore RLIMIT_NPROC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from sandboxes.base import (
    LAUNCHER,
    Limits,
    RunResult,
    Sandbox,
    SandboxError,
    close_pipes,
    decode,
    kill_group,
    launcher_args,
    pump,
)

OPT_IN_ENV = "CISPO_ALLOW_UNSAFE_SANDBOX"


class UnsafeSubprocessSandbox(Sandbox):
    name = "unsafe_subprocess"

    def __init__(
        self, *, allow_unsafe: bool = False, python: str = sys.executable, limits: Limits | None = None
    ) -> None:
        if not (allow_unsafe or os.environ.get(OPT_IN_ENV) == "1"):
            raise SandboxError(
                "unsafe_subprocess sandbox gives no isolation; pass allow_unsafe=True "
                f"(or set {OPT_IN_ENV}=1) to run model code with it anyway"
            )
        self.python = python
        self.limits = limits or Limits()

    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        limits = limits or self.limits
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="cispo-unsafe-") as work:
            path = os.path.join(work, "main.py")
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(source)
            proc = subprocess.Popen(
                [self.python, "-I", "-c", LAUNCHER, path, *launcher_args(limits)],
                cwd=work,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work},
                process_group=0,
            )
            data = stdin.encode("utf-8", errors="surrogateescape")
            io = pump(proc, data, start + timeout_s, limits.output_bytes)
            # Kill the group even after a clean exit: background children must not outlive the run.
            kill_group(proc)
            code = proc.wait()
            close_pipes(proc)
        reason = "timeout" if io.timed_out else "output_limit" if io.over_output else ""
        return RunResult(
            exit_code=None if reason else code,
            stdout=decode(io.stdout),
            stderr=decode(io.stderr),
            timed_out=io.timed_out,
            killed_reason=reason,
            duration_s=time.monotonic() - start,
            applied_limits=["rlimits", "wall_clock", "output_cap", "scrubbed_env"],
            backend=self.name,
        )
