"""Types shared by every sandbox backend: limits, results, the backend contract, the output pump."""

from __future__ import annotations

import abc
import contextlib
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

MiB = 1 << 20


@dataclass
class Limits:
    """Resource limits for one run. ``None`` disables a limit (not recommended for model code)."""

    address_space_bytes: int | None = 1024 * MiB  # RLIMIT_AS per process
    cpu_seconds: int | None = 10  # RLIMIT_CPU per process (SIGXCPU, then SIGKILL)
    file_size_bytes: int | None = 16 * MiB  # RLIMIT_FSIZE
    open_files: int | None = 64  # RLIMIT_NOFILE
    processes: int | None = 32  # RLIMIT_NPROC (and pids.max where a pids cgroup is available)
    memory_bytes: int | None = 512 * MiB  # cgroup memory limit for the whole run, where available
    output_bytes: int = 1 * MiB  # stdout and stderr each; the run is killed when either exceeds it
    tmpfs_bytes: int = 64 * MiB  # size of the private work dir and /tmp (bwrap)


@dataclass
class RunResult:
    """What one sandboxed program did. ``killed_reason`` is empty when it exited on its own."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str = ""
    duration_s: float = 0.0
    applied_limits: list[str] = field(default_factory=list)
    backend: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.killed_reason


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (missing binary, refused opt-in), as opposed to the program failing."""


class Sandbox(abc.ABC):
    """Runs untrusted Python source. Backends differ in isolation, never in this contract."""

    name: str = "base"

    @abc.abstractmethod
    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        """Run ``source`` as ``__main__`` with ``stdin``; never raises for anything the program does."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing
        """Release long-lived resources (clients, cgroups)."""


# Runs inside the sandbox before the program: the limits must be set by a process that is already inside
# the sandbox's user namespace, so RLIMIT_NPROC counts only this sandbox's processes (see bwrap.py).
# The program runs in the same interpreter (runpy) to avoid a second interpreter start.
LAUNCHER = """\
import resource, runpy, sys
for name, value in zip(("AS", "CPU", "FSIZE", "NOFILE", "NPROC"), sys.argv[2:7]):
    if value != "-":
        v = int(value)
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (v, v))
path = sys.argv[1]
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


def launcher_args(limits: Limits) -> list[str]:
    """The five rlimit arguments LAUNCHER expects, ``-`` for an unset limit."""
    values = (
        limits.address_space_bytes,
        limits.cpu_seconds,
        limits.file_size_bytes,
        limits.open_files,
        limits.processes,
    )
    return ["-" if v is None else str(int(v)) for v in values]


@dataclass
class PumpResult:
    stdout: bytes
    stderr: bytes
    timed_out: bool
    over_output: bool


def pump(proc: subprocess.Popen, stdin: bytes, deadline: float, output_cap: int) -> PumpResult:
    """Feed stdin and drain stdout/stderr until both close, the deadline passes or output exceeds the cap.

    Stops early (without waiting for the process) on a timeout or an output overflow; the caller kills.
    """
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
        bufs[stream.fileno()] = bytearray()
    pending = memoryview(stdin)
    if proc.stdin is not None:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    timed_out = over = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 0.5)):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        n = os.write(stream.fileno(), pending[:65536])  # type: ignore[union-attr]
                    except (BrokenPipeError, BlockingIOError) as e:
                        n = 0 if isinstance(e, BlockingIOError) else len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(stream)
                        stream.close()  # type: ignore[union-attr]
                    continue
                chunk = os.read(stream.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(stream)
                    continue
                buf = bufs[stream.fileno()]  # type: ignore[union-attr]
                buf += chunk
                if len(buf) > output_cap:
                    del buf[output_cap:]
                    over = True
            if over:
                break
    finally:
        sel.close()
    assert proc.stdout is not None and proc.stderr is not None
    return PumpResult(bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, over)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group the backend started (``process_group=0``); ignore if already gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def close_pipes(proc: subprocess.Popen) -> None:
    """Close our ends now rather than at garbage collection, so busy pools do not run out of fds."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def signal_reason(returncode: int | None) -> str:
    """Name the signal that ended a process (``-9`` -> ``signal:SIGKILL``); empty for a normal exit."""
    if returncode is None or returncode >= 0:
        return ""
    try:
        return f"signal:{signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal:{-returncode}"
