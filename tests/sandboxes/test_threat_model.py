"""One test per claim in the ``sandboxes`` threat model, on this host, no mocks.

Every test runs on bwrap and on Docker (the ``sandbox`` fixture; Docker skips only where no engine answers
and, after each Docker test, asserts that none of its containers is left on the engine).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sandboxes import Limits, Sandbox
from sandboxes.cgroups import sweep_stale
from sandboxes.docker_sandbox import DEADLINE_GRACE_S
from tests.sandboxes.conftest import TEST_LABEL, cgroup_leaves, containers_left, host_pids_with


def _src(code: str) -> str:
    return textwrap.dedent(code).strip() + "\n"


def test_no_network_even_to_host_loopback(sandbox: Sandbox) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept_all() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            pass

    t = threading.Thread(target=accept_all, daemon=True)
    t.start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the listener is real
        time.sleep(0.1)
        assert len(accepted) == 1
        r = sandbox.run(
            _src(f"""
            import socket
            for host in ("127.0.0.1", "localhost", "8.8.8.8"):
                try:
                    socket.create_connection((host, {port} if host != "8.8.8.8" else 53), timeout=2)
                    print("CONNECTED", host)
                except OSError as e:
                    print("blocked", host, type(e).__name__)
            """),
            timeout_s=10,
        )
        assert r.exit_code == 0, r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3
        time.sleep(0.1)
        assert len(accepted) == 1  # nothing from the sandbox reached the host listener
    finally:
        server.close()


def test_cannot_write_outside_workdir(sandbox: Sandbox) -> None:
    probe = f"cispo-probe-{secrets.token_hex(4)}"
    r = sandbox.run(
        _src(f"""
        import os
        for d in ("/usr", "/usr/lib", "/", "/etc", "/proc/sys", "/dev"):
            try:
                open(os.path.join(d, "{probe}"), "w").write("x")
                print("WROTE", d)
            except OSError:
                print("denied", d)
        open("/work/ok.txt", "w").write("fine")
        open("/tmp/{probe}", "w").write("private")
        print("workdir", open("/work/ok.txt").read())
        """)
    )
    assert r.exit_code == 0, r.stderr
    assert "WROTE" not in r.stdout and "workdir fine" in r.stdout
    assert not os.path.exists(f"/tmp/{probe}")  # the sandbox's /tmp is its own tmpfs


def test_host_files_not_visible(sandbox: Sandbox, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret")
    os.chmod(tmp_path, 0o755)
    secret.chmod(0o644)
    r = sandbox.run(
        _src(f"""
        import os
        print(sorted(os.listdir("/")))
        for p in ({str(secret)!r}, "/etc/passwd", "/root", "/home", {os.getcwd()!r}):
            print(p, os.path.exists(p))
        """)
    )
    assert r.exit_code == 0, r.stderr
    listing = r.stdout.split("\n", 1)[1]
    if getattr(sandbox, "image", "cispo-python").startswith("cispo-python"):
        assert "True" not in listing, r.stdout
    else:  # a stock image has its own /etc/passwd, /root and /home; the host's files must still be absent
        assert f"{secret} False" in listing and f"{os.getcwd()} False" in listing, r.stdout


def test_parent_environment_not_visible(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    token = secrets.token_hex(16)
    monkeypatch.setenv("CISPO_TEST_API_KEY", token)
    r = sandbox.run(
        _src("""
        import os
        print(dict(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print(open(f"/proc/{pid}/environ").read())
                except OSError:
                    pass
        """)
    )
    assert r.exit_code == 0, r.stderr
    assert token not in r.stdout and "CISPO_TEST_API_KEY" not in r.stdout


def test_runs_unprivileged(sandbox: Sandbox) -> None:
    r = sandbox.run(
        _src("""
        import ctypes, os
        print("uid", os.getuid(), os.geteuid(), os.getgid())
        status = open("/proc/self/status").read()
        print([l for l in status.splitlines() if l.startswith(("CapEff", "CapPrm"))])
        try:
            os.setuid(0); print("SETUID OK")
        except OSError:  # EPERM, or EINVAL because no uid 0 exists in the namespace
            print("setuid denied")
        libc = ctypes.CDLL(None, use_errno=True)
        print("unshare", libc.unshare(0x10000000))  # CLONE_NEWUSER
        """)
    )
    assert r.exit_code == 0, r.stderr
    assert "uid 65534 65534 65534" in r.stdout
    assert "CapEff:\\t0000000000000000" in r.stdout and "CapPrm:\\t0000000000000000" in r.stdout
    assert "setuid denied" in r.stdout and "unshare -1" in r.stdout


def test_infinite_loop(sandbox: Sandbox) -> None:
    r = sandbox.run("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and not r.ok
    assert r.duration_s < 3


def test_cpu_limit_ends_busy_program(sandbox: Sandbox) -> None:
    r = sandbox.run("while True:\n    pass\n", timeout_s=10, limits=Limits(cpu_seconds=1))
    assert not r.timed_out and r.exit_code not in (0, None) and r.duration_s < 5


def test_memory_bomb(sandbox: Sandbox) -> None:
    r = sandbox.run("x = bytearray(8 * 1024**3)\nprint('ALLOCATED')\n", timeout_s=10)
    assert r.exit_code != 0 and "ALLOCATED" not in r.stdout and "MemoryError" in r.stderr


def test_memory_cgroup_where_available(sandbox: Sandbox) -> None:
    limits = Limits(address_space_bytes=None, memory_bytes=128 << 20)
    probe = sandbox.run("pass\n", limits=limits)
    if "cgroup_memory" not in probe.applied_limits:
        pytest.skip(f"no writable memory cgroup on this host; applied: {probe.applied_limits}")
    r = sandbox.run(
        "chunks = []\nfor i in range(20):\n    chunks.append(bytearray(32 << 20))\n"
        "    print(i, flush=True)\n",
        timeout_s=20,
        limits=limits,
    )
    assert r.killed_reason == "memory_limit" and r.exit_code != 0
    assert int(r.stdout.split()[-1]) < 5  # killed near 128 MiB, well before 640 MiB


def test_fork_bomb(sandbox: Sandbox) -> None:
    marker = f"forkbomb-{secrets.token_hex(4)}"
    leaves_before = cgroup_leaves()
    r = sandbox.run(
        _src(f"""
        import os, sys, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    argv = [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"]
                    os.execv(sys.executable, argv)
                n += 1
        except OSError as e:
            print("forks", n, e.errno)
        """),
        timeout_s=15,
        limits=Limits(processes=16),
    )
    assert r.exit_code == 0, r.stderr
    assert int(r.stdout.split()[1]) <= 16
    time.sleep(0.3)
    assert host_pids_with(marker) == []  # the children died with the run
    # and the run's cgroups were removed; leaves of other users' concurrent runs on this host come and go
    new = cgroup_leaves() - leaves_before
    deadline = time.monotonic() + 20
    while new and time.monotonic() < deadline:
        time.sleep(0.2)
        new &= cgroup_leaves()
    assert new == set()


def test_file_size_limit(sandbox: Sandbox) -> None:
    r = sandbox.run(
        "open('/work/big', 'wb').write(b'x' * (8 << 20))\nprint('WROTE')\n",
        limits=Limits(file_size_bytes=1 << 20),
    )
    assert r.exit_code != 0 and "WROTE" not in r.stdout


def test_open_files_limit(sandbox: Sandbox) -> None:
    r = sandbox.run(
        "fs = [open('/dev/null') for _ in range(100)]\nprint('OPENED')\n", limits=Limits(open_files=32)
    )
    assert r.exit_code != 0 and "Too many open files" in r.stderr


def test_endless_output(sandbox: Sandbox) -> None:
    r = sandbox.run(
        "while True:\n    print('x' * 4096)\n", timeout_s=10, limits=Limits(output_bytes=64 << 10)
    )
    assert r.killed_reason == "output_limit" and len(r.stdout) <= 64 << 10 and r.duration_s < 5


def test_daemon_does_not_survive(sandbox: Sandbox) -> None:
    marker = f"daemon-{secrets.token_hex(4)}"
    r = sandbox.run(
        _src(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for fd in (0, 1, 2):
                    os.close(fd)
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
            os._exit(0)
        print("parent done")
        """)
    )
    assert r.exit_code == 0 and "parent done" in r.stdout and r.duration_s < 3
    time.sleep(0.3)
    assert host_pids_with(marker) == []


def test_cannot_kill_parent(sandbox: Sandbox) -> None:
    me = os.getpid()
    r = sandbox.run(
        _src(f"""
        import os, signal
        for pid in ({me}, {os.getppid()}, os.getppid(), 1, -1):
            try:
                os.kill(pid, signal.SIGKILL)
                print("sent", pid)
            except OSError as e:
                print("failed", pid, type(e).__name__)
        print("still here")
        """)
    )
    assert f"failed {me}" in r.stdout  # the host's pid does not exist in the sandbox's pid namespace
    assert os.getpid() == me  # and we are alive to read the result
    os.kill(os.getppid(), 0)


# bwrap dies with the scorer at once (--die-with-parent); a Docker container outlives it until its pid 1
# gives up (timeout + DEADLINE_GRACE_S), then the engine removes it (AutoRemove).
DIES_WITHIN_S = {"bwrap": (60, 5.0), "docker": (4, 4 + DEADLINE_GRACE_S + 10.0)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["bwrap", "docker"])
def test_sandbox_dies_with_parent(backend: str, request: pytest.FixtureRequest, tmp_path) -> None:
    box = request.getfixturevalue("bwrap" if backend == "bwrap" else "docker_sandbox")
    timeout_s, within_s = DIES_WITHIN_S[backend]
    marker = f"orphan-{secrets.token_hex(4)}"
    kwargs = {} if backend == "bwrap" else {"labels": dict([TEST_LABEL])}
    scorer = tmp_path / "scorer.py"
    scorer.write_text(
        _src(f"""
        from sandboxes import get_sandbox
        get_sandbox({backend!r}, **{kwargs!r}).run(
            "import os, sys; "
            "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])",
            timeout_s={timeout_s},
        )
        """)
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(scorer)], cwd=root, env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 20
        while not host_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_pids_with(marker), "the sandboxed program never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + within_s
        while (host_pids_with(marker) or _containers(box)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host_pids_with(marker) == []
        assert _containers(box) == []
    finally:
        proc.kill()
        if backend == "bwrap":
            # the killed scorer could not remove its cgroup leaves; nothing else runs here, so sweep them now
            sweep_stale(min_age_s=0)


def _containers(box: Sandbox) -> list[str]:
    return containers_left(box) if box.name == "docker" else []
