"""The backend registry, the contract every backend shares, the pool's bound, and the opt-in rules."""

from __future__ import annotations

import time

import pytest

from sandboxes import Limits, Sandbox, SandboxError, SandboxPool, available_sandboxes, get_sandbox
from sandboxes.unsafe import OPT_IN_ENV


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


def test_docker_backend_when_an_engine_answers() -> None:
    try:
        box = get_sandbox("docker")
    except SandboxError as e:
        pytest.skip(f"no Docker engine here: {e}")
    r = box.run(
        "import os, socket\nprint(os.getuid(), input())\nsocket.create_connection(('1.1.1.1', 53), 2)\n",
        stdin="hi\n",
    )
    assert r.stdout.startswith("65534 hi") and r.exit_code != 0  # no network
    t = box.run("while True:\n    pass\n", timeout_s=2)
    assert t.timed_out
