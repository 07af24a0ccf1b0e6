"""The seccomp filter every sandboxed program runs under: one table, compiled by libseccomp.

Namespaces and dropped capabilities already stop most of what a program could do to the host; these are
the system calls that still reach something through them (S1-S4 in the threat model, ``sandboxes``):

- S1 socket families: a fresh network namespace has no interfaces, but ``AF_VSOCK`` is not namespaced (on
  a VM it reaches the hypervisor host) and netlink, packet and the inet stacks are kernel code the program
  has no use for. Only ``AF_UNIX`` stays (asyncio, multiprocessing and socketpair need it). io_uring goes
  too: it opens sockets and does I/O without the calls this filter sees.
- S2 other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd`` and ``kcmp`` read or
  take what another process holds; bwrap's init (pid 1) is dumpable and holds the run's pipes.
- S3 kernel interfaces that are attack surface and nothing a program needs: ``perf_event_open``,
  ``userfaultfd``, ``bpf`` and the key-management calls.
- S4 calls that only capabilities stop today (mounts, namespaces, modules, kexec, reboot, swap, accounting,
  file handles): refused again here, so a capability leaked by a bug or a backend is not enough.

Denied calls fail with ``EPERM`` rather than killing the process, so a program sees an ordinary error and
tests can tell the filter's refusal apart from a crash. The filter is built for the machine's own ABI;
a call through any other ABI on the same kernel (``int 0x80`` i386 or x32 on x86_64, arm32 on aarch64)
gets ``EPERM`` whatever it is, so it cannot route around the table.

bwrap installs the program with ``--seccomp FD``; the Docker backend stacks the same program on top of the
engine's own profile (see ``docker_sandbox``). Built with libseccomp (Debian ``libseccomp2``) through the
``pyseccomp`` ctypes binding.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import tempfile
from dataclasses import dataclass

from sandboxes.base import SandboxError

AF_UNIX = 1


@dataclass(frozen=True)
class Denial:
    """System calls refused for one claim; ``unless_arg0`` keeps a call whose first argument equals it."""

    claim: str
    syscalls: tuple[str, ...]
    unless_arg0: int | None = None


DENIALS: tuple[Denial, ...] = (
    Denial("S1", ("socket", "socketpair"), unless_arg0=AF_UNIX),
    Denial("S1", ("io_uring_setup", "io_uring_enter", "io_uring_register")),
    Denial("S2", ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp")),
    Denial("S3", ("perf_event_open", "userfaultfd", "bpf", "add_key", "keyctl", "request_key")),
    Denial(
        "S4",
        (
            "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
            "fsmount", "fspick", "mount_setattr", "unshare", "setns", "init_module", "finit_module",
            "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
            "open_by_handle_at", "name_to_handle_at", "quotactl", "syslog",
        ),
    ),
)  # fmt: skip


def denied_syscalls() -> list[str]:
    """Every system call name the table refuses (in at least some form)."""
    return [name for d in DENIALS for name in d.syscalls]


@functools.lru_cache(maxsize=1)
def bpf_program() -> bytes:
    """The compiled classic-BPF filter for this machine's ABI (``struct sock_filter`` array, 8 bytes each).

    Raises SandboxError when libseccomp or its binding is missing: a sandbox must not run without it.
    """
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError) as e:  # RuntimeError: the binding found no libseccomp.so
        raise SandboxError(
            f"seccomp filter: cannot load libseccomp ({type(e).__name__}: {e}); install Debian's "
            "'libseccomp2' (apt-get install -y --no-install-recommends libseccomp2) and the 'pyseccomp' "
            "package"
        ) from e
    deny = sc.ERRNO(errno.EPERM)
    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, deny)  # any foreign ABI (i386 int 0x80, x32) is refused outright
    for denial in DENIALS:
        for name in denial.syscalls:
            number = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if number == -1:  # unknown to this libseccomp; other negatives are calls this ABI lacks
                raise SandboxError(f"seccomp filter: libseccomp {_version(sc)} does not know '{name}'")
            if denial.unless_arg0 is None:
                filt.add_rule(deny, number)
            else:
                filt.add_rule(deny, number, sc.Arg(0, sc.NE, denial.unless_arg0))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        program = f.read()
    if not program or len(program) % 8:
        raise SandboxError(f"seccomp filter: libseccomp exported {len(program)} bytes, not a BPF program")
    return program


def _version(sc: object) -> str:
    return getattr(sc, "__version__", "?")


def machine() -> str:
    """The architecture the filter is compiled for (``platform.machine()``), for engines to compare with."""
    return platform.machine()


def program_fd() -> int:
    """A fresh memfd holding the filter, at offset 0, for ``bwrap --seccomp FD``; the caller closes it."""
    fd = os.memfd_create("cispo-seccomp")
    try:
        os.write(fd, bpf_program())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
