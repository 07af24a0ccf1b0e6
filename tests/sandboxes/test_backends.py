"""The backend registry, the contract every backend shares, the pool's bound, and the opt-in rules."""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import Iterator

import pytest

import sandboxes.docker_sandbox as docker_sandbox_module
from sandboxes import Limits, Sandbox, SandboxError, SandboxPool, available_sandboxes, get_sandbox
from sandboxes.docker_sandbox import LABEL
from sandboxes.unsafe import OPT_IN_ENV
from tests.sandboxes.conftest import TEST_LABEL, containers_left


def _src(code: str) -> str:
    return textwrap.dedent(code).strip() + "\n"


def test_registry_names_and_unknown() -> None:
    assert {"bwrap", "docker", "unsafe_subprocess"} <= set(available_sandboxes())
    with pytest.raises(ValueError, match="unknown sandbox 'nope'.*bwrap"):
        get_sandbox("nope")


def test_missing_bwrap_binary_is_a_clear_error() -> None:
    with pytest.raises(SandboxError, match="bubblewrap"):
        get_sandbox("bwrap", bwrap="/nonexistent/bwrap")


def test_stdin_stdout_stderr_exit_code(bwrap: Sandbox) -> None:
    r = bwrap.run(
        "import sys\nname = input()\nprint('hello', name)\nprint('oops', file=sys.stderr)\nsys.exit(3)\n",
        stdin="world\n",
    )
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (
        3,
        "hello world\n",
        "oops\n",
        False,
        "",
    )
    assert r.backend == "bwrap" and not r.ok


def test_large_stdin_and_source(bwrap: Sandbox) -> None:
    data = "x" * (1 << 20)
    r = bwrap.run("import sys\nprint(len(sys.stdin.read()))\n" + "# pad\n" * 50_000, stdin=data)
    assert r.ok and r.stdout.strip() == str(1 << 20)


def test_rlimits_reach_the_program(bwrap: Sandbox) -> None:
    limits = Limits(
        address_space_bytes=900 << 20, cpu_seconds=7, file_size_bytes=3 << 20, open_files=40, processes=9
    )
    r = bwrap.run(
        "import resource as r\nprint([r.getrlimit(getattr(r, 'RLIMIT_' + n))[0] "
        "for n in ('AS', 'CPU', 'FSIZE', 'NOFILE', 'NPROC')])\n",
        limits=limits,
    )
    assert r.ok, r.stderr
    assert r.stdout.strip() == str([900 << 20, 7, 3 << 20, 40, 9])
    for name in ("rlimit_as", "rlimit_nproc", "wall_clock", "output_cap"):
        assert name in r.applied_limits


def test_pool_bounds_concurrency_and_keeps_order(bwrap: Sandbox) -> None:
    sources = [f"import time\ntime.sleep(0.4)\nprint({i})\n" for i in range(4)]
    with SandboxPool(bwrap, max_concurrency=2) as pool:
        start = time.monotonic()
        results = pool.map(sources, timeout_s=10)
        elapsed = time.monotonic() - start
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3"]
    assert 0.8 <= elapsed < 4.0  # two waves of two: bounded, yet concurrent (serial would be >= 1.6 s)


def test_pool_rejects_mismatched_stdins(bwrap: Sandbox) -> None:
    with SandboxPool(bwrap, 1) as pool, pytest.raises(ValueError, match="2 sources but 1 stdins"):
        pool.map(["pass", "pass"], stdins=[""])


def test_unsafe_subprocess_refuses_without_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    with pytest.raises(SandboxError, match="allow_unsafe=True"):
        get_sandbox("unsafe_subprocess")


def test_unsafe_subprocess_runs_when_opted_in() -> None:
    box = get_sandbox("unsafe_subprocess", allow_unsafe=True)
    r = box.run("print(input()[::-1])\n", stdin="abc\n")
    assert r.ok and r.stdout == "cba\n"
    t = box.run("while True:\n    pass\n", timeout_s=0.5)
    assert t.timed_out and t.duration_s < 3


# --- docker: the same contract on a real engine (launch/docker_engine.sh starts one as root) ---


@pytest.fixture
def docker_box(docker_sandbox: Sandbox) -> Iterator[Sandbox]:
    yield docker_sandbox
    assert containers_left(docker_sandbox) == [], "stray containers after the test"


def test_docker_without_an_engine_is_a_clear_error() -> None:
    with pytest.raises(SandboxError, match="no Docker engine answers.*docker_engine.sh"):
        get_sandbox("docker", base_url="unix:///nonexistent/docker.sock")


def test_docker_stdin_stdout_stderr_exit_code(docker_box: Sandbox) -> None:
    r = docker_box.run(
        "import sys\nname = input()\nprint('hello', name)\nprint('oops', file=sys.stderr)\nsys.exit(3)\n",
        stdin="world\n",
    )
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (
        3,
        "hello world\n",
        "oops\n",
        False,
        "",
    )
    assert r.backend == "docker" and not r.ok
    data = "x" * (1 << 20)
    big = docker_box.run("import sys\nprint(len(sys.stdin.read()))\n" + "# pad\n" * 50_000, stdin=data)
    assert big.ok and big.stdout.strip() == str(1 << 20)
    early = docker_box.run("print('not reading stdin')\n", stdin=data * 4)  # exits before we finish writing
    assert early.ok and early.stdout == "not reading stdin\n"


def test_docker_limits_reach_the_program(docker_box: Sandbox) -> None:
    limits = Limits(
        address_space_bytes=900 << 20, cpu_seconds=7, file_size_bytes=3 << 20, open_files=40, processes=9
    )
    r = docker_box.run(
        _src("""
        import glob, resource as r
        print([r.getrlimit(getattr(r, "RLIMIT_" + n))[0] for n in ("AS", "CPU", "FSIZE", "NOFILE")])
        for pattern in ("/sys/fs/cgroup/pids*/pids.max", "/sys/fs/cgroup/memory*/memory.limit_in_bytes",
                        "/sys/fs/cgroup/memory.max"):
            for path in glob.glob(pattern):
                print(path.rsplit("/", 1)[1], open(path).read().strip())
        """),
        limits=limits,
    )
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str([900 << 20, 7, 3 << 20, 40])
    assert "pids.max 9" in lines and str(512 << 20) in r.stdout  # the cgroups, not RLIMIT_NPROC
    for name in ("network_none", "uid:65534", "cgroup_memory", "cgroup_pids", "rlimit_as", "output_cap"):
        assert name in r.applied_limits
    assert "rlimit_nproc" not in r.applied_limits


def test_docker_pid1_cannot_be_stopped_signalled_or_read(docker_box: Sandbox) -> None:
    r = docker_box.run(
        _src("""
        import ctypes, os, signal
        print("ppid", os.getppid())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
            os.kill(1, sig)
        for path in ("/proc/1/mem", "/proc/1/environ"):
            try:
                open(path, "rb").read(1)
                print("READ", path)
            except OSError:
                print("denied", path)
        print("ptrace", ctypes.CDLL(None).ptrace(16, 1, 0, 0))  # PTRACE_ATTACH
        print("done")
        """),
        timeout_s=10,
    )
    assert r.ok, (r.stdout, r.stderr)
    assert "ppid 1" in r.stdout and "READ" not in r.stdout and "ptrace -1" in r.stdout and "done" in r.stdout


def test_docker_pool_keeps_order(docker_box: Sandbox) -> None:
    with SandboxPool(docker_box, max_concurrency=2) as pool:
        results = pool.map([f"print({i} * {i})\n" for i in range(4)], timeout_s=20)
    assert [r.stdout.strip() for r in results] == ["0", "1", "4", "9"]


def test_docker_missing_image_and_never_started_sweep(
    docker_box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SandboxError, match="none of the images"):
        get_sandbox("docker", image="cispo-no-such-image:0")
    api = docker_box.client.api  # type: ignore[attr-defined]
    labels = {LABEL: "1", TEST_LABEL[0]: TEST_LABEL[1]}
    orphan = api.create_container(docker_box.image, command=["true"], labels=labels)["Id"]  # type: ignore[attr-defined]
    try:
        assert len(containers_left(docker_box)) == 1  # the stray-container check sees a container
        monkeypatch.setattr(docker_sandbox_module, "STALE_CREATED_S", -1.0)
        get_sandbox("docker").close()  # a new scorer removes what a dead one created but never started
        assert containers_left(docker_box) == []
    finally:
        with contextlib.suppress(Exception):
            api.remove_container(orphan, force=True)
