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

Covered by the seccomp filter (``sandboxes/seccomp.py``: one table, compiled by libseccomp; bwrap loads it
with ``--seccomp``, Docker's pid 1 stacks it on the engine's profile; tests in
``tests/sandboxes/test_seccomp.py``, on both backends). A refused call fails with EPERM:
- S1 Only ``AF_UNIX`` sockets: ``socket``/``socketpair`` of any other family (``AF_VSOCK``, which no network
  namespace covers and which reaches a VM's host; netlink, packet, inet, inet6) and io_uring, which opens
  sockets without those calls (``test_s1_only_unix_sockets``, ``test_s1_io_uring_refused``). Every call
  through a foreign ABI (i386 ``int 0x80`` or x32 on x86_64) is refused whatever it is
  (``test_s1_foreign_abi_cannot_route_around_the_filter``).
- S2 No reaching into other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd`` and
  ``kcmp``, on its children, its parent and pid 1 alike (``test_s2_cannot_reach_into_other_processes``).
- S3 No kernel interfaces that are attack surface and of no use to a program: ``perf_event_open``,
  ``userfaultfd``, ``bpf``, ``add_key``, ``keyctl``, ``request_key``
  (``test_s3_kernel_attack_surface_refused``).
- S4 Mounts, namespaces (``unshare``, ``setns``), ``chroot``, modules, kexec, reboot, swap, accounting,
  file handles, quotas and ``syslog`` are refused even to a process that holds the capability for them (a
  second wall behind C4; ``test_s4_privileged_calls_refused_even_with_capabilities``).
- The filter is built for the host's own ABI (Docker checks that the engine's matches); a sandbox refuses
  to start where libseccomp is missing, and Docker runs nothing when pid 1 cannot load it
  (``test_docker_runs_nothing_when_the_filter_does_not_load``).

Not covered:
- Kernel exploits: namespaces share the host kernel. Use the ``docker`` backend on a gVisor/Kata runtime
  or a VM for hostile code.
- CPU-time side channels and timing noise between concurrent runs (cgroup cpu shares are not set).
- Reading what the interpreter's own process holds: a program can introspect its own memory, and read and
  write ``/proc/<pid>/mem`` of any process in the sandbox that is dumpable (bwrap's init, pid 1, is, and
  it holds the run's stdin, stdout and stderr pipes): S2 refuses the system calls, but opening a path is
  not something seccomp can judge. Reward code must keep its secrets out of the program's processes; see
  "The solution forges a pass" below for how the code reward does.
- Limits the host does not allow: without a writable memory/pids cgroup only rlimits apply
  (``RunResult.applied_limits`` reports what was in force).
- ``unsafe_subprocess`` isolates nothing (it refuses to run unless opted in).
- ``docker``: the same claims hold and the same tests prove them (launch/docker_engine.sh starts a private
  engine for them; CI runs them). Differences: the pids cgroup replaces RLIMIT_NPROC (without a user
  namespace that rlimit would count every container's uid-65534 processes), and if the scorer itself is
  killed, a container lives until its timeout + 2 s before the engine removes it.

The solution forges a pass (``rewards.code``)
=============================================
Here the adversary wants 1.0 for a wrong solution. ``rewards.code.check`` runs ``rewards/code_harness.py``
(with ``code_protocol``, ``code_runner`` and ``code_solution``, as one program) in the sandbox: the tests run
in a *test process*; the solution runs in a second process (the *solution
process*), forked from it before the job is read, that the tests reach through two pipes. The scorer sends a
random pass line (128 bits) on stdin; the test process writes it only after the tests passed, and the
score is 1.0 only if it is in stdout. Each class is proved by ``test_f<N>_*`` in
``tests/rewards/test_code_forgery.py`` (F7: ``test_code_forgery_f7.py``, on bwrap, Docker and
``unsafe_subprocess``); before this design F1, F2 (frames, ``__main__``/inspect), F3 (``/proc/self/mem``),
F4 and F6 scored 1.0 or raised, and before F7's rule the three F7 attacks did.

Covered:
- F1 Rebinding what the tests use (``builtins.exec``/``compile``/``abs``/``len``, ``sys.modules``, a
  module-level ``def abs``): the solution process is not the tests' interpreter, and names of builtins are
  never taken from the solution's namespace.
- F2 Reading the pass line from the interpreter (caller frames, ``gc``, ``__main__``'s globals,
  ``inspect``): the solution process is forked before the test process reads the job, and no solution
  code runs before stdin has been read to its end, so it never holds the pass line or the tests.
- F3 Reading it from memory, files, argv, the environment or the stdin pipe (``/proc/*/mem``,
  ``/proc/*/environ``, the work dir, ``/proc/1/fd/0``): it is never on disk, in argv or the environment,
  the stdin pipe is empty by then, and the test process is non-dumpable (``PR_SET_DUMPABLE`` 0), so a
  same-uid process without capabilities (C4) cannot open its mem/environ/fd, ptrace it or take its fds.
- F4 Always-equal return values (``__eq__`` always True, int/list subclasses, numbers whose ``abs`` and
  comparisons lie): values are rebuilt by the test process from JSON (json's C scanner) as built-in types
  only; any other object stays in the solution process as a handle that equals no value of the tests
  (two handles are equal when they are one object, or dataclass instances of one class whose compared
  fields, fetched as plain data, the test process finds equal).
- F5 Leaving early, killing the harness, fake output (``os._exit(0)``, ``SystemExit`` in a call, ``kill``
  of the test process or of every process, pass lines or protocol replies written to every fd): the
  solution's stdout/stderr are /dev/null; its exit, death or a reply outside the protocol fails the run
  even when the tests catch the error; a killed test process writes no pass line; exit status 0 alone is
  not trusted (bwrap's init, which reports it, is traceable by the solution).
- F6 ``check_io``: the expected output never enters the sandbox; output is split on ``\\n`` only, with
  ASCII whitespace ignored at line ends, so unicode separators or trailing garbage do not pass; a lone
  surrogate in the program scores 0 and one in a case becomes ``?``, instead of raising.
- F7 Code of the solution's choosing in the test process (a tested name bound to a module named
  ``unittest.__main__``, whose import runs ``unittest.main()``: discovery in the work dir imports a
  ``test_*.py`` the solution wrote there, which reads the pass line from frames or hands the tests an
  always-equal object): the test process never imports a name the solution chose. A name the solution
  bound to a module is imported only when the module's name is that very name, the one the tests use
  (``math`` for ``import math``; never a dotted name, never an alias such as ``np``, never
  ``this``/``antigravity``), from a ``sys.path`` without any entry the solution can write or create (the
  work dir, TMPDIR, missing paths, and for a non-root user any writable one), with ``/`` as its cwd.

How fidelity stays inside F1-F7 (``tests/rewards/test_code_fidelity.py``: the styles, and the guards):
- The solution runs as the module ``solution``, not ``__main__``, so its main block does not run; a
  ``SystemExit`` of 0 or None while its module runs ends the module, keeping what it defined. Any other exit,
  and any exit during a call, is F5.
- Only objects the tests' own source defined are collected and run (``TestCase`` classes, ``test*``
  functions, ``Test*`` classes): nothing the solution sends is a class or function of the test process. If
  the tests exit themselves (``unittest.main()``), their exit status is the verdict.
- A callable the tests pass to the solution stays in the test process; the solution can only call it (with
  plain data and handles), and the result crosses back as plain data. Only functions and methods that the
  tests' source defined, pure built-ins (``len``, ``sorted``, ``int``, ...), methods of immutable built-in
  types (``str.lower``; not ``str.format``, whose ``{0.attr}`` reads attributes), ``math``/``operator``
  functions and ``itemgetter``/``attrgetter`` cross: never ``getattr``, ``eval``, ``open``, a bound method
  or a module, which would give the solution the test process. A callback id the tests never issued breaks
  the protocol.
- ``isinstance``/``issubclass`` against a class of the solution is answered by the solution process, and
  dataclass equality compares fields the solution process reports: both are the solution's word, as any
  class the tests take from the completion is (below); a plain expected value is never equal to a handle.

Not covered (a wrong solution can still score 1.0, or the score is not the whole story):
- Weak tests: special-casing the inputs the tests use is a weak test set, not a forgery; the solution
  sees every argument the tests pass it (never the expected values, unless the tests pass them).
- Tests that trust the completion: a helper or value the tests take from the completion's namespace is
  the solution's to choose (HumanEval/32's ``poly``, /38's ``encode_cyclic``, a ``from math import
  isclose`` the tests rely on), and ``isinstance`` or equality against the completion's own classes
  (a metaclass can answer ``isinstance`` as it likes). Modules the tests use through the solution's imports
  are imported by the test process itself, under the tests' own names (F7), so those are not the
  solution's.
- Anything that gives the solution CAP_SYS_PTRACE over the test process (a kernel exploit; a backend that
  grants the capability) undoes F2/F3. ``unsafe_subprocess`` runs as the scorer's user: the solution can
  read or trace the scorer itself, and write the interpreter's files (as root every ``sys.path`` entry is
  writable, so F7 there rests on the import rule alone).
- The failure reason is not authenticated: the solution can write to stderr through bwrap's init (when
  the scorer is not root; the pipes are root's otherwise) and change the reason text, never the score.
- What fidelity costs: only plain data crosses, so a test that passes an object of its own other than the
  callables above (a ``TreeNode`` it built, a generator) fails (TypeError), a returned object other than
  plain data (numpy becomes lists and scalars) equals only itself unless it is a dataclass, ``type(x) is
  C`` is never true for a handle, an exception class of the solution cannot be caught by name, attribute
  assignment on the solution's objects is refused, pytest fixtures other than ``parametrize`` are not
  supported, a test that uses a module only under the completion's alias (``np``) must import it itself,
  and the tests cannot capture the solution's stdout; list, dict and set arguments the solution changes are
  changed in the tests too.
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
