"""CISPO vs GRPO vs DAPO on tasks RL must discover, at K = 1, 4 and 16 minibatch updates per batch, each
algorithm tuned the same way on a seed that is never reported.

    python benchmarks/algorithms.py --task scratchpad --phase tune --resume      # lr x clip at K = 4, 16
    python benchmarks/algorithms.py --task scratchpad --phase report --resume --jobs 2   # K x algo x 5 seeds
    python benchmarks/algorithms.py --task scratchpad --phase ablation --resume \\
        --override algorithm.loss_kwargs.token_mask=true --override algorithm.loss_kwargs.eps_high=0.28 \\
        --override algorithm.loss_kwargs.eps_low=0.2          # CISPO K = 16 with a trust region, one change
    python benchmarks/algorithms.py --task long --phase tune --resume            # the same on long traces
    python benchmarks/algorithms.py --task scratchpad --phase report --dry-run   # the plan and its time only

Tasks: `scratchpad` is experiment=algorithms_bench (sums of 6-8 terms, ~17-token traces), `long` is
experiment=algorithms_long (traces of 150+ tokens; K = 4 and 16 only). Every run is a real `cispo-train`
with the algorithm's preset (configs/algorithm/*.yaml), the same rollout budget, and its lr and clip
parameter as Hydra overrides (learner.lr=..., algorithm.loss_kwargs.eps_high=...).

The rule (benchmarks/algorithms_stats.py): `tune` runs, per algorithm at K = 4 and 16, lr in {3e-5, 1e-4}
(the long task adds 1e-5) x its clip parameter (CISPO eps_high in {1, 2, 4} with eps_low 1; DAPO eps_high
in {0.28, 0.4} with eps_low 0.2; GRPO eps in {0.1, 0.2}) on seed 100; per (task, algorithm, K) the setting
with the best mean held-out accuracy after step 0 is kept (ties: fewer steps to target, then the smaller
lr); K = 1 reuses the K = 4 choice. `report` runs the chosen values on seeds 0-4; `ablation` runs CISPO at
K = 16 with the --override list appended (recorded in the JSON), to test a suspected cause of its collapse.

Everything of a task lives in benchmarks/results/algorithms_<task>.json (written after every run, so a
Ctrl-C loses only the run in progress; --resume skips the finished runs, keyed by task, phase, algorithm, K,
seed, lr, clip and overrides) with algorithms_<task>.md beside it, and docs/algorithms_<task>.png
(accuracy against steps and wall time, entropy per step). The first study's algorithms.json (schema 1, one
lr, 3 seeds) stays as it was; load_result() reads it as phase `legacy`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import algorithms_stats as stats  # noqa: E402
from benchmarks.algorithms_report import plot, report_markdown  # noqa: E402
from benchmarks.algorithms_stats import ALGORITHMS, RunSpec  # noqa: E402
from cispo.driver.update import RATIO_CAP_KEYS, RATIO_KEYS, ratio_bounds  # noqa: E402

__all__ = ["ALGORITHMS", "curves", "load_result", "main", "phase_plan"]

# What each run records per step, beside the held-out accuracy: the loss's own metrics go under its name.
STEP_KEYS = (
    "reward/mean",
    "entropy",
    "response_length/mean",
    "train_infer/logprob_corr",
    "rollout/samples_generated",
    "time/step_s",
)
# The per-step diagnostics of why large K collapses (cispo.driver.update.ratio_metrics) and the optimizer's.
DIAG_KEYS = (*RATIO_KEYS, *RATIO_CAP_KEYS, "actor/grad_norm")
LOSS_KEYS = ("clip_frac", "clip_frac_low", "clip_frac_high", "is_weight_mean", "is_weight_max",
             "grad_zeroed_frac", "ratio_mean", "approx_kl")  # fmt: skip
SCHEMA_VERSION = 2  # 1: the first study (algorithms.json), one lr for all, no phases
# Targets fixed before any RL run of the task, from its start: scratchpad 0.203 with 60 steps to reach 0.5,
# long 0.199 with 40 steps to reach 0.3.
TASKS: dict[str, dict[str, Any]] = {
    "scratchpad": {"experiment": "algorithms_bench", "report_ks": (1, 4, 16), "target": 0.5,
                   "what": "scratchpad sums of 6-8 terms"},
    "long": {"experiment": "algorithms_long", "report_ks": (4, 16), "target": 0.3,
             "what": "long traces (150+ tokens)"},
}  # fmt: skip
PHASES = ("tune", "report", "ablation")


def train(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """One cispo-train run in a subprocess; its curves, or the error with the log's tail."""
    run_dir = Path(args.runs) / run_dir_name(spec.key)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"experiment={TASKS[spec.task]['experiment']}",
        f"algorithm={spec.algorithm}",
        f"algorithm.updates_per_batch={spec.k}",
        f"experiment.seed={spec.seed}",
        *([f"experiment.total_steps={args.steps}"] if args.steps else []),
        f"learner.lr={spec.lr}",
        *(f"algorithm.loss_kwargs.{name}={value}" for name, value in spec.loss_kwargs),
        *spec.overrides,
        # A collapsed policy (every group's reward equal for many steps) is a result to record, not an error.
        "algorithm.zero_variance_action=warn",
        "resume=never",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CISPO_CACHE": args.cache}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cispo.driver.cli", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=args.run_timeout_s,
        )  # fmt: skip
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timeout:  # recorded as failed (rerun by --resume); the study goes on
        code, log = "timeout", str(timeout.stdout or "") + str(timeout.stderr or "")
    record = {**spec.record(), "interval": _interval(spec.algorithm, effective_kwargs(spec)),
              "process_wall_s": time.perf_counter() - started, "cli_overrides": overrides}  # fmt: skip
    if code != 0:
        return {**record, "error": f"exit {code}", "log_tail": log[-3000:]}
    return {**record, **curves(run_dir / "metrics.jsonl", spec.algorithm)}


def effective_kwargs(spec: RunSpec) -> dict[str, float]:
    """The loss kwargs the run trains with: the chosen ones, then any `algorithm.loss_kwargs.X=v` among
    its overrides (the ablation's), as Hydra applies them (the last one wins)."""
    kwargs: dict[str, float] = dict(spec.loss_kwargs)
    for override in spec.overrides:
        name, _, value = override.partition("=")
        if name.startswith("algorithm.loss_kwargs."):
            try:
                kwargs[name.removeprefix("algorithm.loss_kwargs.")] = float(value)
            except ValueError:
                continue  # not a bound (e.g. token_mask=true)
    return kwargs


def run_dir_name(key: str) -> str:
    """A directory name for a run key that Hydra's override grammar accepts in hydra.run.dir (a key holds
    '=' and ','), made unique again by a hash of the key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:150] + "_" + hashlib.sha1(key.encode()).hexdigest()[:8]


def _interval(algo: str, loss_kwargs: dict[str, float]) -> list[float] | None:
    """[lo, hi] of the weight (CISPO) or ratio (DAPO, GRPO) after the offset convention."""
    bounds = ratio_bounds(algo, loss_kwargs)
    return None if bounds is None else [round(bounds[0], 10), round(bounds[1], 10)]


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
    series = {key: [_finite(r.get(key)) for r in steps] for key in (*STEP_KEYS, *DIAG_KEYS)}
    series.update({f"loss/{key}": [_finite(r.get(f"{algo}/{key}")) for r in steps] for key in LOSS_KEYS})
    return {
        "steps": [r["step"] for r in steps],
        "wall_s": wall,
        "eval": {"step": [e[0] for e in evals], "wall_s": [e[1] for e in evals],
                 "accuracy": [e[2] for e in evals]},
        "warmstart_accuracy": start.get("warmstart/accuracy"),
        "series": series,
    }  # fmt: skip


def _finite(value: Any) -> Any:
    """NaN (a step that trained nothing logs its training keys as NaN) as null: valid JSON."""
    return None if isinstance(value, float) and value != value else value


def load_result(path: Path, task: str) -> dict[str, Any]:
    """A task's JSON (schema 2), or the first study's algorithms.json (schema 1) read as phase `legacy`
    with the preset clip values it ran with; a missing file is an empty result."""
    if not path.exists():
        return {"schema": SCHEMA_VERSION, "task": task, "runs": []}
    result = json.loads(path.read_text())
    if result.get("schema", 1) >= 2:
        return result
    presets = {"cispo": {"eps_low": 1.0, "eps_high": 4.0}, "dapo": {"eps_low": 0.2, "eps_high": 0.28},
               "grpo": {"eps": 0.2}}  # fmt: skip
    runs = []
    for run in result.get("runs", []):
        spec = RunSpec("scratchpad", "legacy", run["algorithm"], run["K"], run["seed"], run["lr"],
                       stats._kwargs(presets[run["algorithm"]]))  # fmt: skip
        bounds = _interval(run["algorithm"], presets[run["algorithm"]])
        runs.append({**run, **spec.record(), "interval": bounds})
    return {**result, "schema": SCHEMA_VERSION, "task": "scratchpad", "migrated_from_schema": 1, "runs": runs}


def phase_plan(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[RunSpec]:
    """The runs of args.phase; report and ablation read the choices from the task's tuning runs."""
    algos = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(algos) - set(ALGORITHMS))
    if unknown:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {list(ALGORITHMS)}")
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    if args.phase == "tune":
        return stats.tune_plan(args.task, algos, ks or stats.TUNE_KS)
    seeds = [int(s) for s in args.seeds.split(",")]
    choices = stats.choose(runs, args.target)
    if args.phase == "report":
        return stats.report_plan(args.task, algos, ks or TASKS[args.task]["report_ks"], seeds, choices)
    if not args.override:
        raise SystemExit("--phase ablation needs at least one --override (the one change it tests)")
    return stats.report_plan(args.task, ["cispo"], ks or [16], seeds, choices, "ablation", args.override)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="scratchpad")
    parser.add_argument("--phase", choices=PHASES, default="report")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--ks", default="", help="default: tune 4,16; report the task's; ablation 16")
    parser.add_argument("--seeds", default=",".join(map(str, stats.REPORT_SEEDS)), help="report, ablation")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's preset")
    parser.add_argument("--target", type=float, default=None, help="held-out accuracy to reach")
    parser.add_argument("--override", action="append", default=[], help="ablation: Hydra override")
    parser.add_argument("--out", default=None, help="default benchmarks/results/algorithms_<task>.json")
    parser.add_argument("--plot", default=None, help="default docs/algorithms_<task>.png")
    parser.add_argument("--runs", default=None, help="default runs/algorithms_<task>")
    cache = os.environ.get("CISPO_CACHE", str(Path("~/.cache/cispo").expanduser()))
    parser.add_argument("--cache", default=cache, help="where the shared warm start is cached")
    parser.add_argument("--resume", action="store_true", help="skip the runs already finished in --out")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate only")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (a session)")
    parser.add_argument("--run-timeout-s", type=float, default=1800.0)
    parser.add_argument("--jobs", type=int, default=1, help="runs in flight at once (default 1)")
    args = parser.parse_args(argv)
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"algorithms_{args.task}.json")
    args.plot = args.plot or str(REPO / "docs" / f"algorithms_{args.task}.png")
    args.runs = args.runs or str(REPO / "runs" / f"algorithms_{args.task}")
    args.target = TASKS[args.task]["target"] if args.target is None else args.target
    return args


def _print_plan(
    plan: list[RunSpec], todo: list[RunSpec], finished: list[dict[str, Any]], jobs: int = 1
) -> None:
    estimate = stats.estimate_s(-(-len(todo) // jobs), finished)  # ceil: runs in flight at once
    eta = "no finished run to estimate from" if estimate is None else f"about {estimate / 3600:.1f} h"
    print(f"plan: {len(plan)} runs, {len(plan) - len(todo)} already finished, {len(todo)} to run; {eta}",
          flush=True)  # fmt: skip
    for spec in todo:
        print(f"  {spec.key}", flush=True)


def _write(out: Path, result: dict[str, Any]) -> None:
    """Atomically (a kill mid-write leaves the previous file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


def _refresh(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    choices = stats.choose(result["runs"], args.target)
    for name, choice in choices.items():
        choice["interval"] = _interval(name.split("/")[1], choice["loss_kwargs"])
    task, summary = TASKS[args.task], stats.summarise(result["runs"], args.target)
    return {**result, "schema": SCHEMA_VERSION, "task": args.task, "experiment": task["experiment"],
            "target": args.target, "choices": choices, "summary": summary,
            "description": f"experiment={task['experiment']} ({task['what']}), torch learner, 1 rollout "
                           "worker, 2 CPU cores"}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    given = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(given)
    out = Path(args.out)
    result = load_result(out, args.task)
    if result.get("task", args.task) != args.task:
        raise SystemExit(f"{out} holds task {result['task']!r}, not {args.task!r}")
    plan = phase_plan(args, result["runs"])
    finished = [r for r in result["runs"] if "error" not in r]
    todo = stats.pending(plan, [r["key"] for r in finished]) if args.resume else plan
    _print_plan(plan, todo, finished, args.jobs)
    todo = todo[: args.max_runs] if args.max_runs is not None else todo
    if args.dry_run:
        return
    # --resume only reuses finished runs: the command that makes the same result is the one without it.
    command = " ".join(["python benchmarks/algorithms.py", *(a for a in given if a != "--resume")])
    result["commands"] = sorted({*result.get("commands", []), command})
    # Runs in flight at once: a run keeps about one core busy (rollout and learner take turns), so two fit
    # two cores. The study's measures are per step; only the wall-time curves feel a neighbour (recorded).
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        running = [pool.submit(train, spec, args) for spec in todo]
        for i, future in enumerate(as_completed(running), 1):
            run = {**future.result(), "concurrent_runs": args.jobs}
            result["runs"] = [r for r in result["runs"] if r.get("key") != run["key"]] + [run]
            status = run.get("error") or f"final accuracy {run['eval']['accuracy'][-1]:.3f}"
            print(f"[{i}/{len(todo)}] {run['key']}: {status} ({run['process_wall_s']:.0f} s)", flush=True)
            result = _refresh(result, args)
            _write(out, result)  # after every run: a crash or Ctrl-C loses at most the runs in progress
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C: start no queued run (the ones in flight get SIGINT)
    result = _refresh(result, args)
    _write(out, result)
    markdown = report_markdown(result)
    print(markdown)
    out.with_suffix(".md").write_text(markdown)
    task = TASKS[args.task]
    title = f"experiment={task['experiment']}: {task['what']}, mean ± std across seeds"
    plot(result["runs"], title, Path(args.plot))  # the reported matrix and the ablation, not the tuning


if __name__ == "__main__":
    main()
