"""One test per seccomp claim (S1-S4 in the ``sandboxes`` threat model), on this host, no mocks.

Each hostile program prints ``<attempt> <result>`` per line, where the result is ``ok`` or the errno's name;
the claim holds when every attempt gets ``EPERM`` (the filter's answer) and the benign line still prints.
S1-S3 run on bwrap and on Docker (the ``sandbox`` fixture); S4's calls are stopped by missing capabilities
anyway inside both, so its test loads the same filter into a root process on the host, where they would
succeed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import sandboxes
from sandboxes import Sandbox, get_sandbox
from sandboxes.seccomp import DENIALS, bpf_program
from tests.sandboxes.conftest import TEST_LABEL

# Shared by the hostile programs: run a raw system call and name its outcome.
PRELUDE = """\
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def outcome(rc):
    return "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
def report(name, rc):
    print(name, outcome(rc), flush=True)
"""


def _src(code: str) -> str:
    return PRELUDE + textwrap.dedent(code).strip() + "\nprint('benign', sum(range(10)))\n"


def _outcomes(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


def _assert_all_refused(r: sandboxes.RunResult, attempts: list[str]) -> None:
    assert r.ok, (r.exit_code, r.killed_reason, r.stdout, r.stderr)
    got = _outcomes(r.stdout)
    assert {a: got.get(a) for a in attempts} == dict.fromkeys(attempts, "EPERM"), r.stdout
    assert got["benign"] == "45"


def test_s1_only_unix_sockets(sandbox: Sandbox) -> None:
    r = sandbox.run(
        _src("""
        def make(name, *args):
            try:
                socket.socket(*args).close()
                print(name, "ok")
            except OSError as e:
                print(name, errno.errorcode.get(e.errno, e.errno))
        make("vsock", 40, socket.SOCK_STREAM)  # AF_VSOCK: not namespaced, reaches a VM's host
        make("netlink", socket.AF_NETLINK, socket.SOCK_RAW, 0)
        make("inet", socket.AF_INET, socket.SOCK_DGRAM)
        make("inet6", socket.AF_INET6, socket.SOCK_STREAM)
        make("packet", socket.AF_PACKET, socket.SOCK_DGRAM)
        # the kernel reads the family as an int: high bits must not smuggle AF_VSOCK past the filter
        report("vsock_high_bits", libc.syscall(41, ctypes.c_long((1 << 32) | 40), 1, 0))
        pair = (ctypes.c_int * 2)()
        report("socketpair_inet", libc.socketpair(socket.AF_INET, socket.SOCK_STREAM, 0, pair))
        make("unix", socket.AF_UNIX, socket.SOCK_STREAM)
        a, b = socket.socketpair()
        a.send(b"x")
        print("unix_pair", b.recv(1).decode())
        """)
    )
    attempts = ["vsock", "netlink", "inet", "inet6", "packet", "vsock_high_bits", "socketpair_inet"]
    _assert_all_refused(r, attempts)
    assert _outcomes(r.stdout)["unix"] == "ok" and _outcomes(r.stdout)["unix_pair"] == "x"


def test_s1_io_uring_refused(sandbox: Sandbox) -> None:
    r = sandbox.run(
        _src("""
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        report("io_uring_setup", libc.syscall(425, 8, params))
        report("io_uring_register", libc.syscall(427, -1, 0, None, 0))
        """)
    )
    _assert_all_refused(r, ["io_uring_setup", "io_uring_register"])


# i386 socket(AF_VSOCK, SOCK_STREAM, 0) through int 0x80 from a 64-bit process; returns eax.
I386_SOCKET = """\
import ctypes, mmap
code = bytes.fromhex("53" "b867010000" "bb28000000" "b901000000" "31d2" "cd80" "5b" "c3")
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
print("i386_socket", ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))())
"""


def test_s1_foreign_abi_cannot_route_around_the_filter(sandbox: Sandbox) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the i386 ABI probe is x86_64 machine code")
    host = subprocess.run([sys.executable, "-c", I386_SOCKET], capture_output=True, text=True, timeout=30)
    if host.returncode != 0 or int(host.stdout.split()[1]) < 0:
        pytest.skip(f"this kernel runs no i386 system calls, so there is nothing to route: {host}")
    r = sandbox.run(I386_SOCKET)
    assert r.ok, (r.stdout, r.stderr)
    assert r.stdout.split() == ["i386_socket", "-1"]  # -EPERM, not a file descriptor


def test_s2_cannot_reach_into_other_processes(sandbox: Sandbox) -> None:
    r = sandbox.run(
        _src("""
        import signal, time
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
        for name, pid in (("child", child), ("parent", os.getppid()), ("init", 1)):
            report("ptrace_" + name, libc.ptrace(16, pid, None, None))  # PTRACE_ATTACH
        buf = ctypes.create_string_buffer(8)
        local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
        remote = (ctypes.c_void_p * 2)(id(None), 8)
        report("vm_readv", libc.syscall(310, child, local, 1, remote, 1, 0))
        report("vm_writev", libc.syscall(311, child, local, 1, remote, 1, 0))
        for name, pid in (("child", child), ("init", 1)):
            pidfd = libc.syscall(434, pid, 0)  # pidfd_open stays: it only signals, as kill does
            print("pidfd_open_" + name, outcome(pidfd))
            report("pidfd_getfd_" + name, libc.syscall(438, pidfd, 0, 0))
        report("kcmp", libc.syscall(312, os.getpid(), child, 0, 0, 0))  # KCMP_FILE
        os.kill(child, signal.SIGKILL)
        """),
        timeout_s=20,
    )
    attempts = ["ptrace_child", "ptrace_parent", "ptrace_init", "vm_readv", "vm_writev"]
    _assert_all_refused(r, attempts + ["pidfd_getfd_child", "pidfd_getfd_init", "kcmp"])
    assert _outcomes(r.stdout)["pidfd_open_child"] == "ok"


def test_s3_kernel_attack_surface_refused(sandbox: Sandbox) -> None:
    r = sandbox.run(
        _src("""
        attr = ctypes.create_string_buffer(128)  # perf_event_attr: software cpu-clock, user space only
        attr[0:8] = (1).to_bytes(4, "little") + (128).to_bytes(4, "little")
        attr[40] = 0b01100000  # exclude_kernel | exclude_hv: what perf_event_paranoid 2 allows
        report("perf_event_open", libc.syscall(298, attr, 0, -1, -1, 0))
        report("userfaultfd", libc.syscall(323, os.O_CLOEXEC | 1))  # UFFD_USER_MODE_ONLY
        report("add_key", libc.syscall(248, b"user", b"cispo", b"v", 1, -2))  # process keyring
        report("keyctl", libc.syscall(250, 1, None))  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
        report("request_key", libc.syscall(249, b"user", b"cispo", None, 0))
        bpf_attr = ctypes.create_string_buffer(128)
        bpf_attr[0:16] = b"".join(v.to_bytes(4, "little") for v in (2, 4, 8, 1))  # an array map
        report("bpf", libc.syscall(321, 0, bpf_attr, 128))  # BPF_MAP_CREATE
        """)
    )
    attempts = ["perf_event_open", "userfaultfd", "add_key", "keyctl", "request_key", "bpf"]
    _assert_all_refused(r, attempts)


# Calls only capabilities stop inside the sandboxes; run as root on the host, each is harmless: a private
# mount namespace made before the filter, a chroot of a process about to exit, bad magic or missing names.
S4_PROBE = """\
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# first a private mount namespace of its own (MS_REC | MS_PRIVATE), so no mount below reaches the host
assert libc.unshare(0x00020000) == 0 and libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0
if sys.argv[1] == "filtered":
    bpf = open(sys.argv[2], "rb").read()
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
    assert libc.prctl(38, 1, None, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(Prog(len(bpf) // 8, bpf)), 0, 0) == 0  # PR_SET_SECCOMP
def report(name, rc):
    print(name, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)
report("unshare", libc.unshare(0x00020000))  # CLONE_NEWNS
report("mount", libc.mount(b"none", sys.argv[3].encode(), b"tmpfs", 0, None))
report("setns", libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0))
report("chroot", libc.chroot(b"/"))
report("reboot", libc.syscall(169, 0, 0, 0, None))  # bad magic: EINVAL where allowed
report("delete_module", libc.syscall(176, b"cispo_no_such_module", 0))
report("swapoff", libc.syscall(168, b"/cispo/no/such/swap"))
report("open_by_handle_at", libc.syscall(304, -1, None, 0))
"""


def test_s4_privileged_calls_refused_even_with_capabilities(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the point is that the filter refuses what capabilities would allow")
    bpf = tmp_path / "filter.bpf"
    bpf.write_bytes(bpf_program())
    (tmp_path / "mnt").mkdir()

    def probe(mode: str) -> dict[str, str]:
        cmd = [sys.executable, "-I", "-c", S4_PROBE, mode, str(bpf), str(tmp_path / "mnt")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return _outcomes(done.stdout)

    unfiltered, filtered = probe("bare"), probe("filtered")
    assert len(filtered) == 8 and set(filtered.values()) == {"EPERM"}, filtered
    # and not because root lacks the right: without the filter, none of them is refused for permission
    assert "EPERM" not in unfiltered.values() and unfiltered["unshare"] == unfiltered["mount"] == "ok"


def test_benign_programs_run_under_the_filter(sandbox: Sandbox) -> None:
    r = sandbox.run(
        textwrap.dedent("""
        import asyncio, json, subprocess, sys, threading
        out = []
        t = threading.Thread(target=lambda: out.append(sum(range(10))))
        t.start(); t.join()
        async def main():
            reader, writer = await asyncio.open_connection(sock=__import__("socket").socketpair()[0])
            writer.close()
            return 1
        child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
        print(json.dumps([out[0], asyncio.run(main()), child.stdout.strip()]))
        """),
        timeout_s=20,
    )
    assert r.ok, r.stderr
    assert r.stdout.strip() == '[45, 1, "42"]' and "seccomp" in r.applied_limits


def test_docker_runs_nothing_when_the_filter_does_not_load(docker_sandbox: Sandbox) -> None:
    box = get_sandbox("docker", labels=dict([TEST_LABEL]))
    try:
        box._bpf = bytes(8)  # type: ignore[attr-defined]  # one load, no return: the kernel refuses it
        r = box.run("print('RAN')\n")
    finally:
        box.close()
    assert r.killed_reason == "sandbox_setup" and "RAN" not in r.stdout, (r.stdout, r.stderr)
    assert "seccomp" in r.stderr


def test_threat_model_lists_every_seccomp_claim() -> None:
    doc = sandboxes.__doc__ or ""
    tests = {name for name in globals() if name.startswith("test_s")}
    for claim in sorted({d.claim for d in DENIALS}):
        assert f"- {claim} " in doc, f"{claim} is not in the threat model"
        assert any(t.startswith(f"test_{claim.lower()}_") and f"``{t}``" in doc for t in tests), claim
