"""How much does the bwrap sandbox cost per program, compared with a bare subprocess?

Runs the same trivial Python program N times through (a) a bare ``subprocess.run`` of the same interpreter
and (b) the bwrap backend, at concurrency 1 and 2, and reports programs/s, mean and p95 latency, and the
per-run overhead of bwrap over bare. Prints a table and writes JSON.

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

from sandboxes import SandboxPool, get_sandbox  # noqa: E402

PROGRAM = "import sys\nprint(sum(range(1000)))\n"
PYTHON = "/usr/bin/python3"


def bare(source: str) -> float:
    start = time.monotonic()
    out = subprocess.run([PYTHON, "-I", "-c", source], capture_output=True, timeout=30, check=True)
    assert out.stdout.strip() == b"499500"
    return time.monotonic() - start


def measure(run_one: Callable[[str], float], runs: int, concurrency: int) -> dict[str, float]:
    run_one(PROGRAM)  # warm the page cache
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(run_one, [PROGRAM] * runs))
    wall = time.monotonic() - start
    latencies.sort()
    return {
        "programs_per_s": runs / wall,
        "mean_latency_ms": 1000 * statistics.fmean(latencies),
        "p95_latency_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/sandbox_throughput.json")
    args = ap.parse_args()

    box = get_sandbox("bwrap", python=PYTHON)
    applied = box.run(PROGRAM).applied_limits
    rows = []
    for concurrency in (1, 2):
        pool = SandboxPool(box, concurrency)

        def sandboxed(source: str, pool: SandboxPool = pool) -> float:
            r = pool.run(source, timeout_s=30)
            assert r.ok and r.stdout.strip() == "499500", r
            return r.duration_s

        b = measure(bare, args.runs, concurrency)
        s = measure(sandboxed, args.runs, concurrency)
        pool.close()
        rows.append(
            {
                "concurrency": concurrency,
                "bare": b,
                "bwrap": s,
                "overhead_ms_per_run": s["mean_latency_ms"] - b["mean_latency_ms"],
            }
        )

    print(f"{'backend':<8} {'conc':>4} {'programs/s':>11} {'mean ms':>8} {'p95 ms':>8} {'overhead ms':>12}")
    for row in rows:
        for name in ("bare", "bwrap"):
            m = row[name]
            over = f"{row['overhead_ms_per_run']:.1f}" if name == "bwrap" else "-"
            print(
                f"{name:<8} {row['concurrency']:>4} {m['programs_per_s']:>11.1f} "
                f"{m['mean_latency_ms']:>8.1f} {m['p95_latency_ms']:>8.1f} {over:>12}"
            )
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
