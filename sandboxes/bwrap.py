"""The default Linux backend: bubblewrap (Debian ``bubblewrap``) as an unprivileged uid.

Why each piece is there:
- bwrap is started as uid/gid 65534 (when we are root) because root ignores RLIMIT_NPROC and a root-owned
  process outside a user namespace keeps capabilities over the host.
- ``--unshare-all`` gives the program its own user, pid, net, ipc, uts and cgroup namespaces: the new
  network namespace has only its own loopback, so host services on 127.0.0.1 are unreachable.
- rlimits are set by the launcher *inside* the user namespace, so RLIMIT_NPROC counts only this run's
  processes instead of every concurrent run that shares uid 65534.
- ``--block-fd`` holds the sandbox until its first process is in the run's cgroups, so nothing it forks
  can escape the memory/pids limits.
- ``--die-with-parent`` plus the pid namespace: when the scorer dies or the run ends, every process the
  program started dies with it.
- ``--seccomp`` loads ``sandboxes.seccomp``'s filter (claims S1-S4) just before the interpreter starts: it
  is built once per process and handed over in a memfd on every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
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
from sandboxes.cgroups import RunCgroups, create_run_cgroups, sweep_stale
from sandboxes.seccomp import bpf_program, program_fd

WORKDIR = "/work"
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORKDIR, "PYTHONDONTWRITEBYTECODE": "1"}
NOBODY = 65534
VENV_MOUNT = "/opt/cispo-python"


def _root_binds(python: str) -> list[str]:
    """Read-only system dirs (merged-/usr symlinks reproduced as symlinks) plus the interpreter's prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if prefix not in ("/usr", "/"):
        args += ["--ro-bind", prefix, prefix]
    return args


def _venv_binds(python: str) -> tuple[list[str], str]:
    """A virtual environment's interpreter (``<venv>/bin/python3`` beside ``<venv>/pyvenv.cfg``, e.g. the
    set-up script's ``.venv-sandbox``) runs from a read-only bind of the venv at VENV_MOUNT: outside the
    writable /work, whatever the host path. Any other interpreter runs as it is."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    if not os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        return [], python
    return ["--ro-bind", venv, VENV_MOUNT], f"{VENV_MOUNT}/bin/{os.path.basename(python)}"


def _read_child_pid(fd: int, deadline: float) -> int | None:
    """bwrap writes JSON with the sandbox's first pid to --info-fd; read it before unblocking the run."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return int(json.loads(data)["child-pid"])
    return None


class BwrapSandbox(Sandbox):
    """bubblewrap backend; see the module docstring and ``sandboxes/__init__`` for the threat model."""

    name = "bwrap"

    def __init__(
        self,
        *,
        python: str = "/usr/bin/python3",
        bwrap: str = "bwrap",
        uid: int = NOBODY,
        gid: int = NOBODY,
        use_cgroups: bool = True,
        limits: Limits | None = None,
    ) -> None:
        found = shutil.which(bwrap)
        if found is None:
            raise SandboxError(
                f"bwrap sandbox: '{bwrap}' not found; install Debian's 'bubblewrap' "
                "(apt-get install -y --no-install-recommends bubblewrap)"
            )
        if not os.path.exists(python):
            raise SandboxError(f"bwrap sandbox: interpreter '{python}' does not exist")
        if not sys.platform.startswith("linux"):
            raise SandboxError("bwrap sandbox: Linux only")
        self.bwrap, self.python, self.uid, self.gid = found, python, uid, gid
        self.use_cgroups = use_cgroups and os.geteuid() == 0
        if self.use_cgroups:
            sweep_stale()  # leaves of an earlier scorer that was killed mid-run
        self.limits = limits or Limits()
        venv, self._exe = _venv_binds(python)
        self._binds = _root_binds(python) + venv
        bpf_program()  # fail here, not per run, where libseccomp is missing

    def _command(self, limits: Limits, src_fd: int, info_fd: int, block_fd: int, bpf_fd: int) -> list[str]:
        cmd = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
        cmd += ["--new-session"]
        cmd += ["--cap-drop", "ALL", "--hostname", "sandbox", "--uid", str(self.uid), "--gid", str(self.gid)]
        cmd += ["--clearenv"]
        for k, v in SANDBOX_ENV.items():
            cmd += ["--setenv", k, v]
        cmd += self._binds + ["--proc", "/proc", "--dev", "/dev"]
        for mount in ("/tmp", WORKDIR):
            cmd += ["--size", str(limits.tmpfs_bytes), "--tmpfs", mount]
        cmd += ["--file", str(src_fd), f"{WORKDIR}/main.py", "--chdir", WORKDIR]
        # bwrap's root and /dev are writable tmpfs by default; only /work and /tmp should be.
        cmd += ["--remount-ro", "/dev", "--remount-ro", "/"]
        cmd += ["--seccomp", str(bpf_fd), "--info-fd", str(info_fd), "--block-fd", str(block_fd), "--"]
        cmd += [self._exe, "-I", "-c", LAUNCHER, f"{WORKDIR}/main.py", *launcher_args(limits)]
        return cmd

    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        limits = limits or self.limits
        start = time.monotonic()
        cg = create_run_cgroups(limits.memory_bytes, limits.processes) if self.use_cgroups else RunCgroups()
        src_fd = os.memfd_create("cispo-sandbox-src")
        bpf_fd = program_fd()
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        try:
            os.write(src_fd, source.encode("utf-8", errors="surrogateescape"))
            os.lseek(src_fd, 0, os.SEEK_SET)
            drop = {"user": self.uid, "group": self.gid, "extra_groups": []} if os.geteuid() == 0 else {}
            proc = subprocess.Popen(
                self._command(limits, src_fd, info_w, block_r, bpf_fd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(src_fd, info_w, block_r, bpf_fd),
                env={"PATH": "/usr/bin:/bin"},
                process_group=0,
                **drop,
            )
        except BaseException:
            cg.remove()
            for fd in (src_fd, bpf_fd, info_r, info_w, block_r, block_w):
                os.close(fd)
            raise
        for fd in (src_fd, bpf_fd, info_w, block_r):
            os.close(fd)
        try:
            return self._supervise(proc, cg, limits, stdin, start + timeout_s, start, info_r, block_w)
        finally:
            # Each fd is closed exactly once, here: a double close could hit a concurrent run's new fd.
            os.close(info_r)
            os.close(block_w)
            close_pipes(proc)
            cg.kill_all()
            cg.remove()

    def _supervise(
        self,
        proc: subprocess.Popen,
        cg: RunCgroups,
        limits: Limits,
        stdin: str,
        deadline: float,
        start: float,
        info_r: int,
        block_w: int,
    ) -> RunResult:
        child = _read_child_pid(info_r, deadline)
        if child is not None:
            cg.attach(child)
        with contextlib.suppress(OSError):  # bwrap already failed if the pipe is gone; stderr says why
            os.write(block_w, b"x")
        io = pump(proc, stdin.encode("utf-8", errors="surrogateescape"), deadline, limits.output_bytes)
        if io.timed_out or io.over_output:
            kill_group(proc)
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = proc.wait()
            io.timed_out = True
        reason = "timeout" if io.timed_out else "output_limit" if io.over_output else ""
        if not reason and code != 0 and cg.memory_exceeded():
            reason = "memory_limit"
        if not reason and code == 1 and child is None and io.stderr.startswith(b"bwrap: "):
            reason = "sandbox_setup"  # bwrap itself failed before the program started; stderr says why
        return RunResult(
            exit_code=None if reason in ("timeout", "output_limit") else code,
            stdout=decode(io.stdout),
            stderr=decode(io.stderr),
            timed_out=io.timed_out,
            killed_reason=reason,
            duration_s=time.monotonic() - start,
            applied_limits=self.applied_limits(limits) + cg.applied,
            backend=self.name,
        )

    def applied_limits(self, limits: Limits) -> list[str]:
        """Limits every bwrap run gets, before any cgroups (which vary by host)."""
        names = ["namespaces:user,pid,net,ipc,uts,cgroup,mount", "readonly_root", f"uid:{self.uid}"]
        names += [
            f"rlimit_{n}"
            for n, v in zip(("as", "cpu", "fsize", "nofile", "nproc"), launcher_args(limits))
            if v != "-"
        ]
        return names + ["seccomp", "wall_clock", "output_cap", "die_with_parent", "scrubbed_env"]
