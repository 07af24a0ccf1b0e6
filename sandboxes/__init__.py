"""Run untrusted, model-written Python programs.

Threat model
============
The adversary is the program: code written by the policy being trained, which RL will push toward whatever
earns reward, including by accident. The default backend is ``bwrap``; the claims below are for it, and
each names the test in ``tests/sandboxes/test_threat_model.py`` that proves it on the host.

Covered (bwrap):
- C1 No network at all: its own network namespace, so even services listening on the host's loopback are
  unreachable (``test_no_network_even_to_host_loopback``).
- C2 The host filesystem is read-only and mostly absent: only /usr (and the interpreter's prefix) is
  visible, read-only; writes land in a private tmpfs work dir that vanishes with the run
  (``test_cannot_write_outside_workdir``, ``test_host_files_not_visible``).
- C3 No secrets from the parent: a scrubbed environment (``test_parent_environment_not_visible``).
- C4 Unprivileged: uid/gid 65534 with no capabilities, no setuid escalation, no new user namespaces
  (``test_runs_unprivileged``).
- C5 Bounded resources: a wall-clock timeout with a kill of the whole sandbox (``test_infinite_loop``),
  RLIMIT_CPU, RLIMIT_AS (``test_memory_bomb``), RLIMIT_NPROC counted per run plus a pids cgroup where
  possible (``test_fork_bomb``), RLIMIT_FSIZE (``test_file_size_limit``), RLIMIT_NOFILE, capped
  stdout/stderr with a kill on overflow (``test_endless_output``), a memory cgroup where the host allows
  it (``test_memory_cgroup_where_available``).
- C6 Nothing outlives the run: own pid namespace, so background processes die with it
  (``test_daemon_does_not_survive``), and ``--die-with-parent`` kills the sandbox if the scorer dies
  (``test_sandbox_dies_with_parent``).
- C7 The scorer cannot be harmed: host processes are invisible and unsignalable
  (``test_cannot_kill_parent``); misbehaving programs return a result, never an exception
  (every test above).

Not covered:
- Kernel exploits: namespaces share the host kernel. Use the ``docker`` backend on a gVisor/Kata runtime
  or a VM for hostile code.
- CPU-time side channels and timing noise between concurrent runs (cgroup cpu shares are not set).
- Reading what the interpreter's own process holds: a program can introspect its own memory, so reward
  code must not rely on secrets placed in the sandboxed interpreter being unforgeable (the code reward's
  completion marker is off disk and out of argv/env, which stops accidental and file-based forgery only).
- Limits the host does not allow: without a writable memory/pids cgroup only rlimits apply
  (``RunResult.applied_limits`` reports what was in force).
- ``unsafe_subprocess`` isolates nothing (it refuses to run unless opted in); ``docker`` isolation is the
  engine's (its tests skip where no engine answers).
"""

from __future__ import annotations

from typing import Any

from cispo.core.registry import Registry, callable_from
from sandboxes.base import Limits, RunResult, Sandbox, SandboxError
from sandboxes.pool import SandboxPool

SANDBOXES: Registry[type[Sandbox]] = Registry(
    "sandbox",
    "cispo.sandboxes",
    lazy={
        "bwrap": "sandboxes.bwrap:BwrapSandbox",
        "docker": "sandboxes.docker_sandbox:DockerSandbox",
        "unsafe_subprocess": "sandboxes.unsafe:UnsafeSubprocessSandbox",
    },
)


def register_sandbox(name: str, target: str | type[Sandbox]) -> None:
    """Add a backend under ``name``: a Sandbox subclass or its ``pkg.mod:Class`` path."""
    if isinstance(target, str):
        SANDBOXES.add_lazy(name, target)
    else:
        SANDBOXES.register(name, target)


def available_sandboxes() -> list[str]:
    return SANDBOXES.names()


def get_sandbox(name: str = "bwrap", **kwargs: Any) -> Sandbox:
    """Build the backend registered as ``name`` with ``kwargs``; raises SandboxError if it cannot run here."""
    return callable_from(SANDBOXES, name)(**kwargs)


__all__ = [
    "Limits",
    "RunResult",
    "Sandbox",
    "SandboxError",
    "SandboxPool",
    "available_sandboxes",
    "get_sandbox",
    "register_sandbox",
]
