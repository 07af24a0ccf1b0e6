"""How much does the bwrap sandbox cost per program, compared with a bare subprocess?

Runs the same trivial Python program N times through (a) a bare ``subprocess.run`` of the same interpreter,
(b) the bwrap backend and (c) the bwrap backend without its seccomp filter (for this measurement only),
at concurrency 1 and 2, and reports programs/s, mean and p95 latency, the per-run overhead of bwrap over
bare and of the filter. (b) and (c) run in alternating batches of 10, so load from other jobs on the box
falls on both alike. Prints a table and writes JSON.

    python benchmarks/sandbox_throughput.py --runs 100 --out benchmarks/results/sandbox_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandboxes import Limits, SandboxPool, get_sandbox  # noqa: E402
from sandboxes.bwrap import BwrapSandbox  # noqa: E402

PROGRAM = "import sys\nprint(sum(range(1000)))\n"
PYTHON = "/usr/bin/python3"


def bare(source: str) -> float:
    start = time.monotonic()
    out = subprocess.run([PYTHON, "-I", "-c", source], capture_output=True, timeout=30, check=True)
    assert out.stdout.strip() == b"499500"
    return time.monotonic() - start


class BwrapWithoutSeccomp(BwrapSandbox):
    """The bwrap backend minus ``--seccomp``: only to price the filter; nothing else may use it."""

    def _command(self, limits: Limits, src_fd: int, info_fd: int, block_fd: int, bpf_fd: int) -> list[str]:
        cmd = super()._command(limits, src_fd, info_fd, block_fd, bpf_fd)
        at = cmd.index("--seccomp")
        return cmd[:at] + cmd[at + 2 :]


def measure(run_one: Callable[[str], float], runs: int, concurrency: int) -> dict[str, float]:
    return summarise(*timed(run_one, runs, concurrency))


def timed(run_one: Callable[[str], float], runs: int, concurrency: int) -> tuple[list[float], float]:
    run_one(PROGRAM)  # warm the page cache
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(run_one, [PROGRAM] * runs))
    return latencies, time.monotonic() - start


def summarise(latencies: list[float], wall: float) -> dict[str, float]:
    latencies = sorted(latencies)
    return {
        "programs_per_s": len(latencies) / wall,
        "mean_latency_ms": 1000 * statistics.fmean(latencies),
        "p95_latency_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }


def measure_alternating(
    run_a: Callable[[str], float], run_b: Callable[[str], float], runs: int, concurrency: int, batch: int = 10
) -> tuple[dict[str, float], dict[str, float]]:
    """Both, in alternating batches: a load swing on the shared box lands on each alike."""
    lat: tuple[list[float], list[float]] = ([], [])
    wall = [0.0, 0.0]
    for _ in range(0, runs, batch):
        for i, run_one in enumerate((run_a, run_b)):
            got, seconds = timed(run_one, batch, concurrency)
            lat[i].extend(got)
            wall[i] += seconds
    return summarise(lat[0], wall[0]), summarise(lat[1], wall[1])


def sandboxed(pool: SandboxPool) -> Callable[[str], float]:
    def run_one(source: str) -> float:
        r = pool.run(source, timeout_s=30)
        assert r.ok and r.stdout.strip() == "499500", r
        return r.duration_s

    return run_one


def row(concurrency: int, runs: int, box: BwrapSandbox, unfiltered: BwrapSandbox) -> dict:
    b = measure(bare, runs, concurrency)
    with SandboxPool(box, concurrency) as pool, SandboxPool(unfiltered, concurrency) as pool_u:
        s, u = measure_alternating(sandboxed(pool), sandboxed(pool_u), runs, concurrency)
    return {
        "concurrency": concurrency,
        "bare": b,
        "bwrap": s,
        "bwrap_no_seccomp": u,
        "overhead_ms_per_run": s["mean_latency_ms"] - b["mean_latency_ms"],
        "seccomp_ms_per_run": s["mean_latency_ms"] - u["mean_latency_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/sandbox_throughput.json")
    args = ap.parse_args()

    box = get_sandbox("bwrap", python=PYTHON)
    assert isinstance(box, BwrapSandbox)
    unfiltered = BwrapWithoutSeccomp(python=PYTHON)
    applied = box.run(PROGRAM).applied_limits
    rows = [row(concurrency, args.runs, box, unfiltered) for concurrency in (1, 2)]

    print(f"{'backend':<17} {'conc':>4} {'programs/s':>11} {'mean ms':>8} {'p95 ms':>8} {'overhead ms':>12}")
    for r in rows:
        for name in ("bare", "bwrap", "bwrap_no_seccomp"):
            m = r[name]
            over = f"{r['overhead_ms_per_run']:.1f}" if name == "bwrap" else "-"
            print(
                f"{name:<17} {r['concurrency']:>4} {m['programs_per_s']:>11.1f} "
                f"{m['mean_latency_ms']:>8.1f} {m['p95_latency_ms']:>8.1f} {over:>12}"
            )
        print(f"seccomp filter, concurrency {r['concurrency']}: {r['seccomp_ms_per_run']:+.1f} ms per run")
    result = {
        "program": PROGRAM,
        "python": PYTHON,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "bwrap_applied_limits": applied,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
