"""CISPO vs GRPO vs DAPO on a task RL must discover, at K = 1, 4 and 16 minibatch updates per batch.

    python benchmarks/algorithms.py            # the full matrix: 3 algorithms x K in {1, 4, 16} x 3 seeds
    python benchmarks/algorithms.py --quick    # K = 4 only: 3 algorithms x 3 seeds
    python benchmarks/algorithms.py --sweep    # the learning-rate sweep (K = 4, seed 0) that chose --lr

Every run is a real `cispo-train experiment=algorithms_bench` (configs/experiment/algorithms_bench.yaml:
scratchpad sums of 6-8 terms, a warm start that teaches the format on other problems, cached once and
shared by all runs) with the algorithm's own preset (configs/algorithm/*.yaml) and the same rollout
budget: steps x prompts x group size. Runs are interleaved (seed, then K, then algorithm) so that drift
in the machine's load is spread over all algorithms rather than falling on one.

Writes benchmarks/results/algorithms.json (every run's curves and the summary; written after each run,
and --resume skips the runs it already holds), benchmarks/results/algorithms.md (the table) and
docs/algorithms.png (mean +- std across seeds of held-out accuracy against steps and against wall time,
one column per K).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_report  # noqa: E402

ALGORITHMS = ("cispo", "grpo", "dapo")
# What each run records per step, beside the held-out accuracy: the loss's own metrics go under its name.
STEP_KEYS = (
    "reward/mean",
    "entropy",
    "response_length/mean",
    "train_infer/logprob_corr",
    "rollout/samples_generated",
    "time/step_s",
)
LOSS_KEYS = ("clip_frac", "clip_frac_low", "clip_frac_high", "is_weight_mean", "is_weight_max",
             "grad_zeroed_frac", "ratio_mean", "approx_kl")  # fmt: skip
SCHEMA_VERSION = 1


def run_id(algo: str, k: int, seed: int, lr: float) -> str:
    return f"{algo}_K{k}_s{seed}_lr{lr:g}"


def train(algo: str, k: int, seed: int, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """One cispo-train run in a subprocess; its curves, or the error with the log's tail."""
    run_dir = Path(args.runs) / run_id(algo, k, seed, lr)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "experiment=algorithms_bench",
        f"algorithm={algo}",
        f"algorithm.updates_per_batch={k}",
        f"experiment.seed={seed}",
        f"experiment.total_steps={args.steps}",
        f"learner.lr={lr}",
        "resume=never",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CISPO_CACHE": args.cache}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cispo.driver.cli", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=args.run_timeout_s,
    )  # fmt: skip
    wall = time.perf_counter() - started
    record: dict[str, Any] = {"algorithm": algo, "K": k, "seed": seed, "lr": lr, "process_wall_s": wall}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {**record, "error": f"exit {proc.returncode}", "log_tail": tail}
    return {**record, **curves(run_dir / "metrics.jsonl", algo)}


def curves(metrics: Path, algo: str) -> dict[str, Any]:
    """Per-step series from a run's metrics.jsonl: wall time (the sum of step times, so start-up and
    evaluation are excluded), held-out accuracy where it ran, and the diagnostics."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = next((r for r in rows if r.get("step") == 0), {})
    steps = [r for r in rows if r.get("step", 0) >= 1 and "reward/mean" in r]
    if not steps:
        raise ValueError(f"{metrics}: no training steps logged")
    wall, elapsed = [], 0.0
    for r in steps:
        elapsed += r.get("time/step_s", 0.0)
        wall.append(elapsed)
    evals = [(0, 0.0, start["eval/accuracy"])] if "eval/accuracy" in start else []
    evals += [(r["step"], w, r["eval/accuracy"]) for r, w in zip(steps, wall) if r.get("eval/ran")]
    series = {key: [r.get(key) for r in steps] for key in STEP_KEYS}
    series.update({f"loss/{key}": [r.get(f"{algo}/{key}") for r in steps] for key in LOSS_KEYS})
    return {
        "steps": [r["step"] for r in steps],
        "wall_s": wall,
        "eval": {"step": [e[0] for e in evals], "wall_s": [e[1] for e in evals],
                 "accuracy": [e[2] for e in evals]},
        "warmstart_accuracy": start.get("warmstart/accuracy"),
        "series": series,
    }  # fmt: skip


def first_reaching(evals: dict[str, list], target: float) -> tuple[float, float] | None:
    """(step, seconds) of the first evaluation at or above target; None if never."""
    for step, wall, acc in zip(evals["step"], evals["wall_s"], evals["accuracy"]):
        if acc >= target:
            return float(step), float(wall)
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell_key(k: int, algo: str, lr: float, by_lr: bool) -> str:
    return f"K{k}/{algo}" + (f"/lr{lr:g}" if by_lr else "")


def summarise(runs: list[dict[str, Any]], target: float, by_lr: bool = False) -> dict[str, Any]:
    """Per (K, algorithm), and learning rate if by_lr (the sweep): final held-out accuracy, steps and
    seconds to the target (over the seeds that reached it), and those ratios against DAPO at the same K
    (and learning rate)."""
    cells: dict[str, dict[str, Any]] = {}
    for run in runs:
        if "error" in run:
            continue
        fresh = {"K": run["K"], "algorithm": run["algorithm"], "lr": run["lr"], "runs": []}
        cell = cells.setdefault(_cell_key(run["K"], run["algorithm"], run["lr"], by_lr), fresh)
        cell["runs"].append(run)
    for cell in cells.values():
        finals = [r["eval"]["accuracy"][-1] for r in cell["runs"]]
        reached = [x for x in (first_reaching(r["eval"], target) for r in cell["runs"]) if x]
        cell.update(
            seeds=len(cell["runs"]),
            final_accuracy=_mean_std(finals),
            # The mean over every evaluation after step 0: steadier than the last point alone.
            mean_accuracy=_mean_std([statistics.fmean(r["eval"]["accuracy"][1:]) for r in cell["runs"]]),
            reached=len(reached),
            steps_to_target=_mean_std([x[0] for x in reached]),
            seconds_to_target=_mean_std([x[1] for x in reached]),
            clip_frac=statistics.fmean(_flat(cell["runs"], "loss/clip_frac")),
            wall_s=statistics.fmean(r["wall_s"][-1] for r in cell["runs"]),
            # DAPO's dynamic sampling draws extra rounds to replace all-equal groups: its cost in samples.
            samples=statistics.fmean(sum(_flat([r], "rollout/samples_generated")) for r in cell["runs"]),
        )
        del cell["runs"]
    for cell in cells.values():
        dapo = cells.get(_cell_key(cell["K"], "dapo", cell["lr"], by_lr))
        if dapo and dapo["reached"] and cell["reached"]:
            cell["steps_ratio_vs_dapo"] = cell["steps_to_target"][0] / dapo["steps_to_target"][0]
            cell["seconds_ratio_vs_dapo"] = cell["seconds_to_target"][0] / dapo["seconds_to_target"][0]
    order = sorted(cells.items(), key=lambda kv: (kv[1]["K"], kv[1]["algorithm"], kv[1]["lr"]))
    return {"target_accuracy": target, "cells": dict(order)}


def _flat(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [v for r in runs for v in r["series"].get(key, []) if v is not None] or [float("nan")]


def table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    fmt = lambda ms, p=3: "-" if ms[0] != ms[0] else f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"  # noqa: E731
    lines = [
        f"{meta['description']}; target held-out accuracy {summary['target_accuracy']:.2f}",
        "",
        "| K | algorithm | lr | seeds | final accuracy | mean accuracy | reached | steps to target | "
        "s to target | steps ratio vs DAPO | s ratio vs DAPO | clip frac | samples | RL wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"].values():
        ratio = lambda key, c=cell: f"{c[key]:.2f}" if key in c else "-"  # noqa: E731
        lines.append(
            f"| {cell['K']} | {cell['algorithm']} | {cell['lr']:g} | {cell['seeds']} | "
            f"{fmt(cell['final_accuracy'])} | {fmt(cell['mean_accuracy'])} | "
            f"{cell['reached']}/{cell['seeds']} | {fmt(cell['steps_to_target'], 1)} | "
            f"{fmt(cell['seconds_to_target'], 0)} | {ratio('steps_ratio_vs_dapo')} | "
            f"{ratio('seconds_ratio_vs_dapo')} | {cell['clip_frac']:.3f} | {cell['samples']:.0f} | "
            f"{cell['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 7), squeeze=False)
    for col, k in enumerate(ks):
        for algo in ALGORITHMS:
            done = [r for r in runs if r["K"] == k and r["algorithm"] == algo and "error" not in r]
            if not done:
                continue
            n = min(len(r["eval"]["accuracy"]) for r in done)
            accs = [[r["eval"]["accuracy"][i] for r in done] for i in range(n)]
            mean = [statistics.fmean(a) for a in accs]
            std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            for row, axis in enumerate(("step", "wall_s")):
                xs = [statistics.fmean(r["eval"][axis][i] for r in done) for i in range(n)]
                ax = axes[row][col]
                ax.plot(xs, mean, marker="o", markersize=3, label=f"{algo} ({len(done)} seeds)")
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.2)  # fmt: skip
        for row, label in enumerate(("step", "RL wall time (s, mean over seeds)")):
            ax = axes[row][col]
            ax.set_title(f"K = {k} updates per batch")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("experiment=algorithms_bench: scratchpad sums of 6-8 terms, mean ± std across seeds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 4 only (3 algorithms x the seeds)")
    parser.add_argument("--sweep", action="store_true", help="learning rates at K = 4, seed 0")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", default="cispo=3e-5,grpo=3e-5,dapo=3e-5", help="per algorithm (from --sweep)")
    parser.add_argument("--sweep-lrs", default="3e-5,1e-4")
    parser.add_argument("--target", type=float, default=0.5, help="held-out accuracy to reach")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "algorithms.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "algorithms.png"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "algorithms_bench"))
    cache = os.environ.get("CISPO_CACHE", str(Path("~/.cache/cispo").expanduser()))
    parser.add_argument("--cache", default=cache, help="where the shared warm start is cached")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--run-timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.ks = "4"
    if args.sweep:
        args.out = args.out.replace(".json", "_sweep.json")
        args.plot = args.plot.replace(".png", "_sweep.png")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, float]]:
    """(algorithm, K, seed, lr) in the interleaved order the runs take."""
    algos = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(algos) - set(ALGORITHMS))
    if unknown:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {list(ALGORITHMS)}")
    if args.sweep:
        lrs = [float(x) for x in args.sweep_lrs.split(",")]
        return [(algo, 4, 0, lr) for lr in lrs for algo in algos]
    lr = {name: float(v) for name, v in (kv.split("=") for kv in args.lr.split(","))}
    ks = [int(x) for x in args.ks.split(",")]
    return [(algo, k, seed, lr[algo]) for seed in range(args.seeds) for k in ks for algo in algos]


def main(argv: list[str] | None = None) -> None:
    given = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(given)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.resume and out.exists() else {}
    done = {run_id(r["algorithm"], r["K"], r["seed"], r["lr"]): r for r in old.get("runs", [])
            if "error" not in r}  # fmt: skip
    runs: list[dict[str, Any]] = []
    todo = plan(args)
    ks = sorted({k for _, k, _, _ in todo})
    meta = {
        "schema": SCHEMA_VERSION,
        # --resume only reuses finished runs: the command that makes the same result is the one without it.
        "command": " ".join(["python benchmarks/algorithms.py", *(a for a in given if a != "--resume")]),
        "description": (
            f"{len(ALGORITHMS)} algorithms x K in {ks} x {args.seeds if not args.sweep else 1} seed(s), "
            f"{args.steps} steps of 16 prompts x 8 samples each, torch learner, 1 rollout worker, 2 CPU cores"
        ),
        "algorithms": sorted({a for a, _, _, _ in todo}),
        "ks": ks,
        "seeds": 1 if args.sweep else args.seeds,
        "steps": args.steps,
    }
    for i, (algo, k, seed, lr) in enumerate(todo, 1):
        key = run_id(algo, k, seed, lr)
        run = done.get(key) or train(algo, k, seed, lr, args)
        runs.append(run)
        status = run.get("error") or f"final accuracy {run['eval']['accuracy'][-1]:.3f}"
        print(f"[{i}/{len(todo)}] {key}: {status} ({run['process_wall_s']:.0f} s)", flush=True)
        summary = summarise(runs, args.target, args.sweep) if any("error" not in r for r in runs) else {}
        # After every run: a crash or Ctrl-C loses at most the run in progress (--resume continues).
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=1))
    summary = summarise(runs, args.target, args.sweep)
    plot(runs, ks, Path(args.plot))
    write_report(out, {**meta, "summary": summary, "runs": runs}, table(summary, meta))


if __name__ == "__main__":
    main()
