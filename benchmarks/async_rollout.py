"""The rollout stream against the synchronous loop, with a long tail of response lengths.

Question: at the 40K -> 80K budget most samples finish early and a few run to the budget, so a synchronous
step waits for its longest trace. How many samples per second do the stream (groups to whichever worker
is free, scored as they finish) and bounded staleness (generation runs ahead while the learner trains)
add, and does accuracy per sample hold?

Every run is a real `cispo-train` (the embedded default: tiny MiniMax, addition, its cached warm start)
on the hf engine with a long tail (rollout/long_tail.py: a tenth of the groups ignore EOS and run to the
budget, 8x the others' length), one Ray rollout worker and the learner in the driver (2 cores). Variants:

- sync: the loop before the stream: one task per worker per step (static shards), max_staleness 0;
- stream: groups handed out one task of 2 groups at a time, max_staleness 0;
- stale1 / stale2: the stream with max_staleness 1 / 2; stale2_partial: with partial rollouts.

Per run: samples per second over the whole loop, the learner's idle fraction (waiting for its batch),
the workers' idle fraction, held-out accuracy against samples and wall time. Runs are interleaved (seed,
then variant) so that drift in the machine's load is spread over all variants.

    python benchmarks/async_rollout.py [--quick] [--seeds 3] [--steps 24]

Writes benchmarks/results/async_rollout.json (every run, written after each; --resume skips those it holds)
and benchmarks/results/async_rollout.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_report  # noqa: E402

ENGINE = "rollout.long_tail:LongTailHFEngine"
BUDGET = 48  # the tail's length; the others answer in about 6 tokens
PROMPTS = 32  # per step, groups of 8: 256 samples
# Equal resources in every variant: one core for the learner, one for the rollout worker. (With the
# default 2 learner threads the synchronous loop uses both cores while the worker idles, and the
# overlapped variants fight the worker for them: benchmarks/results/async_rollout_learner_2_threads.md.)
LEARNER_THREADS = 1
VARIANTS: dict[str, list[str]] = {
    "sync": ["algorithm.max_staleness=0"],
    "stream_small_tasks": ["algorithm.max_staleness=0", "rollout.groups_per_task=2"],
    "stale1": ["algorithm.max_staleness=1"],
    "stale2": ["algorithm.max_staleness=2"],
    "stale2_partial": [
        "algorithm.max_staleness=2", "rollout.partial=true", f"rollout.partial_chunk_tokens={BUDGET // 4}",
    ],
}  # fmt: skip


def run(variant: str, seed: int, steps: int, eval_every: int, out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / f"{variant}-s{seed}"
    command = [
        sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={run_dir}", "resume=never",
        f"experiment.seed={seed}", f"experiment.total_steps={steps}", f"experiment.eval_every={eval_every}",
        "experiment.checkpoint_every=0", f"rollout.engine={ENGINE}", f"rollout.max_new_tokens={BUDGET}",
        "+rollout.engine_kwargs.tail_prefix_tokens=6",  # "ab+cd=": a continuation stays in the tail
        f"data.prompts_per_step={PROMPTS}", f"learner.num_threads={LEARNER_THREADS}",
        "logging.wandb=disabled", "logging.plot=false",
        "logging.progress=false", *VARIANTS[variant],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summarise(variant, seed, rows, time.perf_counter() - start)


def summarise(variant: str, seed: int, rows: list[dict], wall_s: float) -> dict[str, Any]:
    steps = [r for r in rows if "reward/mean" in r]
    loop_s = sum(r["time/step_s"] for r in steps)
    samples = sum(r["rollout/samples_generated"] for r in steps)
    seen, clock, curve = 0.0, 0.0, []
    for r in rows:
        if r["step"] > 0 and "reward/mean" in r:
            seen += r["rollout/samples_generated"]
            clock += r["time/step_s"]
        if r.get("eval/ran"):
            curve.append(
                {"step": r["step"], "samples": seen, "seconds": clock, "accuracy": r["eval/accuracy"]}
            )
    return {
        "variant": variant,
        "seed": seed,
        "samples_per_s": samples / loop_s,
        "learner_idle_frac": sum(r["time/learner_wait_s"] for r in steps) / loop_s,
        "worker_idle_frac": statistics.mean(r["throughput/worker_idle_frac"] for r in steps),
        "staleness_mean": statistics.mean(r["rollout/staleness_mean"] for r in steps),
        "partial_frac": statistics.mean(r["rollout/partial_frac"] for r in steps),
        "final_accuracy": curve[-1]["accuracy"] if curve else float("nan"),
        "loop_s": loop_s,
        "wall_s": wall_s,
        "curve": curve,
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | samples/s (mean ± sd) | x sync | learner idle | worker idle | staleness | partial | "
        "held-out accuracy (final, mean ± sd) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    base = statistics.mean(r["samples_per_s"] for r in by["sync"]) if by["sync"] else float("nan")
    for variant, group in by.items():
        if not group:
            continue
        rate = [r["samples_per_s"] for r in group]
        acc = [r["final_accuracy"] for r in group]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        mean = statistics.mean(rate)
        lines.append(
            f"| {variant} | {mean:.0f} ± {sd(rate):.0f} | {mean / base:.2f} | "
            f"{statistics.mean(r['learner_idle_frac'] for r in group):.2f} | "
            f"{statistics.mean(r['worker_idle_frac'] for r in group):.2f} | "
            f"{statistics.mean(r['staleness_mean'] for r in group):.2f} | "
            f"{statistics.mean(r['partial_frac'] for r in group):.3f} | "
            f"{statistics.mean(acc):.3f} ± {sd(acc):.3f} (n={len(group)}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 steps")
    parser.add_argument("--resume", action="store_true", help="skip the runs the JSON already holds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "async_rollout.json"))
    args = parser.parse_args()
    seeds, steps = (1, 8) if args.quick else (args.seeds, args.steps)
    out = Path(args.out)
    runs: list[dict[str, Any]] = json.loads(out.read_text())["runs"] if args.resume and out.exists() else []
    work = Path(os.environ.get("CISPO_BENCH_DIR", "/tmp/cispo_async_rollout"))
    for seed in range(seeds):
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in runs):
                continue
            runs.append(run(variant, seed, steps, args.eval_every, work))
            print(f"{variant} seed {seed}: {runs[-1]['samples_per_s']:.0f} samples/s, "
                  f"accuracy {runs[-1]['final_accuracy']:.3f}", flush=True)  # fmt: skip
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"steps": steps, "budget": BUDGET, "runs": runs}, indent=2))
    result = {
        "steps": steps, "budget": BUDGET, "prompts_per_step": PROMPTS, "learner_threads": LEARNER_THREADS,
        "runs": runs,
    }  # fmt: skip
    write_report(out, result, table(runs))


if __name__ == "__main__":
    main()
