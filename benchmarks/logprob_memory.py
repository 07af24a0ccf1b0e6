"""Peak memory and time (forward + backward) of chunked vs naive FP32-head token log-probs.

Hidden 1024, vocab 151,936 (Qwen-sized head), fp32. Each case runs in a fresh subprocess so that its peak
RSS is its own; "extra peak" subtracts the RSS after the inputs (hidden states, head weight, targets)
were allocated, i.e. what the log-prob computation itself costs.

    python benchmarks/logprob_memory.py                # T = 4096 (both), 16384 and 65536 (chunked)
    python benchmarks/logprob_memory.py --quick        # T = 1024 and 4096 only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, VOCAB = 1024, 151_936


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(method: str, tokens: int, chunk: int) -> dict[str, float]:
    import torch

    from cispo.algo.logprobs import naive_token_logprobs, token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,))
    coeff = torch.randn(tokens)
    base = _rss_mb()
    start = time.perf_counter()
    if method == "naive":
        logprobs, _ = naive_token_logprobs(hidden, weight, targets)
    else:
        logprobs, _ = token_logprobs(hidden, weight, targets, chunk_size=chunk)
    (logprobs * coeff).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inputs_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    return {
        "method": method,
        "tokens": tokens,
        "chunk": chunk,
        "seconds": seconds,
        "peak_mb": peak,
        "extra_peak_mb": peak - base,
        "inputs_mb": inputs_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/logprob_memory.json")
    parser.add_argument("--only", default="", help="comma-separated method:T cases, e.g. chunked:65536")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.chunk)))
        return
    cases = [("naive", 1024), ("chunked", 1024), ("naive", 4096), ("chunked", 4096)]
    if not args.quick:
        cases += [("chunked", 65536), ("chunked", 16384)]
    if args.only:
        cases = [(m, int(t)) for m, t in (c.split(":") for c in args.only.split(","))]
    out_path = Path(args.out)
    # Results are merged into the JSON after every case: the long cases take minutes each.
    previous = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    rows = [r for r in previous if (r["method"], r["tokens"]) not in set(cases)]
    for method, tokens in cases:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                method,
                str(tokens),
                "--chunk",
                str(args.chunk),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.sort(key=lambda r: (r["tokens"], r["method"] != "naive"))
        print(f"  measured {method} T={tokens}", file=sys.stderr)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"hidden": HIDDEN, "vocab": VOCAB, "rows": rows}, indent=2))
    print_table(rows)


def print_table(rows: list[dict[str, float]]) -> None:
    print("| method | T | time fwd+bwd (s) | peak RSS (MB) | extra peak over inputs (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['tokens']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} "
            f"| {r['extra_peak_mb']:.0f} |"
        )
    by = {(r["method"], r["tokens"]): r for r in rows}
    if ("naive", 4096) in by and ("chunked", 4096) in by:
        n, c = by[("naive", 4096)], by[("chunked", 4096)]
        print(
            f"\nT=4096: chunked extra peak = {c['extra_peak_mb'] / n['extra_peak_mb']:.3f} x naive "
            f"(target <= 0.2); time = {c['seconds'] / n['seconds']:.2f} x naive (target <= 1.2)"
        )
    if ("chunked", 65536) in by:
        c = by[("chunked", 65536)]
        print(
            f"T=65536: chunked extra peak {c['extra_peak_mb'] / 1024:.2f} GB above the inputs "
            "(target <= 4 GB)"
        )


if __name__ == "__main__":
    main()
