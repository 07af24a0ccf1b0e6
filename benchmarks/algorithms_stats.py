"""The statistics and the run plan of benchmarks/algorithms.py, pure (no torch, no training): what runs each
phase makes, which tuning setting each algorithm keeps, and the per-cell means with 95% intervals.

Phases: `tune` (per algorithm at K = 4 and 16: lr x clip parameter on the tuning seed, never reported),
`report` (K x algorithm x 5 fresh seeds with the chosen values), `ablation` (CISPO at K = 16 with extra
overrides that change only the suspected cause of its collapse). A run is keyed by (task, phase, algorithm,
K, seed, lr, clip parameters, overrides), which is what --resume matches.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ALGORITHMS = ("cispo", "grpo", "dapo")
TUNING_SEED = 100  # chooses the settings; never in a reported cell
REPORT_SEEDS = (0, 1, 2, 3, 4)
TUNE_KS = (4, 16)
# The lr grid per task. The long task adds 1e-5 below the scratchpad grid, chosen on the tuning seed only:
# its first tuning runs at 3e-5 ended below the start (0.14-0.20 from 0.199 in 40 steps) and 1e-4 took
# CISPO at K = 4 down to 0.004, so its best lr may lie below 3e-5, the grid's edge.
TUNE_LRS: dict[str, tuple[float, ...]] = {"scratchpad": (3e-5, 1e-4), "long": (1e-5, 3e-5, 1e-4)}
# The clip parameter each algorithm is tuned over, as its loss_kwargs (the other bound held fixed).
CLIP_GRID: dict[str, tuple[dict[str, float], ...]] = {
    "cispo": tuple({"eps_low": 1.0, "eps_high": e} for e in (1.0, 2.0, 4.0)),
    "dapo": tuple({"eps_low": 0.2, "eps_high": e} for e in (0.28, 0.4)),
    "grpo": tuple({"eps": e} for e in (0.1, 0.2)),
}
# K = 1 has no tuning runs of its own: with one update per batch the ratio is 1 up to the train/inference
# mismatch, so the clip parameter hardly acts; it reuses the choice made at K = 4.
K_REUSES = {1: 4}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    task: str
    phase: str
    algorithm: str
    k: int
    seed: int
    lr: float
    loss_kwargs: tuple[tuple[str, float], ...]
    overrides: tuple[str, ...] = field(default=())

    @property
    def clip(self) -> str:
        return ",".join(f"{name}={value:g}" for name, value in self.loss_kwargs)

    @property
    def key(self) -> str:
        parts = [self.task, self.phase, self.algorithm, f"K{self.k}", f"s{self.seed}", f"lr{self.lr:g}"]
        parts.append(self.clip)
        return "/".join(parts + ([";".join(self.overrides)] if self.overrides else []))

    def record(self) -> dict[str, Any]:
        """The fields a run's JSON record carries to say what it was."""
        return {"key": self.key, "task": self.task, "phase": self.phase, "algorithm": self.algorithm,
                "K": self.k, "seed": self.seed, "lr": self.lr, "loss_kwargs": dict(self.loss_kwargs),
                "overrides": list(self.overrides)}  # fmt: skip


def _kwargs(loss_kwargs: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, float(value)) for name, value in loss_kwargs.items()))


def tune_plan(task: str, algorithms: Sequence[str], ks: Sequence[int] = TUNE_KS) -> list[RunSpec]:
    """Every (K, lr, clip) of every algorithm on the tuning seed; algorithms interleaved innermost so that
    drift in the machine's load falls on all of them."""
    widest = max(len(CLIP_GRID[algo]) for algo in algorithms)
    grid = [(k, lr, i) for k in ks for lr in TUNE_LRS[task] for i in range(widest)]
    return [
        RunSpec(task, "tune", algo, k, TUNING_SEED, lr, _kwargs(CLIP_GRID[algo][i]))
        for k, lr, i in grid
        for algo in algorithms
        if i < len(CLIP_GRID[algo])
    ]


def report_plan(
    task: str,
    algorithms: Sequence[str],
    ks: Sequence[int],
    seeds: Sequence[int],
    choices: dict[str, dict[str, Any]],
    phase: str = "report",
    overrides: Sequence[str] = (),
) -> list[RunSpec]:
    """K x algorithm x seeds with the chosen lr and clip (seed, then K, then algorithm); the ablation is the
    same with its overrides appended."""
    missing = [f"K{k}/{a}" for k in ks for a in algorithms if f"K{k}/{a}" not in choices]
    if missing:
        raise SystemExit(f"no tuning choice for {missing}: run --phase tune first (same --task)")
    return [
        RunSpec(task, phase, algo, k, seed, *_chosen(choices[f"K{k}/{algo}"]), tuple(overrides))
        for seed in seeds
        for k in ks
        for algo in algorithms
    ]


def _chosen(choice: dict[str, Any]) -> tuple[float, tuple[tuple[str, float], ...]]:
    return float(choice["lr"]), _kwargs(choice["loss_kwargs"])


def pending(plan: Iterable[RunSpec], done: Iterable[str]) -> list[RunSpec]:
    finished = set(done)
    return [spec for spec in plan if spec.key not in finished]


def estimate_s(todo: int, finished: Sequence[dict[str, Any]]) -> float | None:
    """Seconds for `todo` more runs at the mean process wall time of the finished ones (None if none)."""
    walls = [r["process_wall_s"] for r in finished if "error" not in r and "process_wall_s" in r]
    return todo * statistics.fmean(walls) if walls else None


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (e.g. 12.706 at 1, 4.303 at 2, 2.776
    at 4): bisection on the exact closed-form CDF for integer df (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    low, high = 0.0, 1000.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for T ~ Student t with integer df."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0  # 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
    for j in range(1, (df - 1) // 2):
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval: t_{0.975, n-1} * s / sqrt(n)); NaN where undefined (no
    value; one value has no spread, so its half-width is NaN rather than a fake 0)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def difference_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), half-width of its 95% Welch interval): t at the Welch-Satterthwaite df, rounded
    down (the wider interval); NaN where a side has fewer than 2 values; 0 when neither side varies."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        return (statistics.fmean(a) - statistics.fmean(b) if a and b else float("nan")), float("nan")
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, t_quantile_975(max(1, math.floor(df))) * math.sqrt(va + vb)


def verdict(steps_diff: tuple[float, float], auc_diff: tuple[float, float] = (0.0, 0.0)) -> str:
    """From (CISPO - other) steps to target and mean accuracy (the area under the held-out curve): "faster"
    when either interval excludes 0 in CISPO's favour (fewer steps, higher area) and neither against it,
    "slower" the other way round, "mixed" when they disagree, else "equal" (no difference this many
    seeds resolve). Both read speed: censored steps alone cannot tell 0/5 from 4/5 seeds reaching the
    target when the latter's steps vary widely."""
    signs = set()
    for (diff, half), better in ((steps_diff, -1.0), (auc_diff, 1.0)):
        if diff != diff or half != half:
            return "-"
        if abs(diff) > half:
            signs.add("faster" if diff * better > 0 else "slower")
    return "mixed" if len(signs) == 2 else signs.pop() if signs else "equal"


def _per_seed(runs: list[dict[str, Any]], target: float) -> dict[str, list[float]]:
    """Per run: steps to target censored (a run that never reaches it counts as its total steps, a lower
    bound), mean accuracy after step 0, final accuracy."""
    reached = [first_reaching(r["eval"], target) for r in runs]
    return {
        "steps_to_target_censored": [
            x[0] if x else float(r["steps"][-1]) for r, x in zip(runs, reached, strict=True)
        ],
        "mean_accuracy": [auc(r["eval"]) for r in runs],
        "final_accuracy": [r["eval"]["accuracy"][-1] for r in runs],
    }


def comparisons(groups: dict[str, list[dict[str, Any]]], target: float) -> list[dict[str, Any]]:
    """CISPO against each baseline at every reported K, and each ablation against the reported CISPO cell
    it changes: the difference of means (first minus second) with its 95% Welch interval, per measure."""
    pairs = []
    for name in groups:
        phase, k, algo = name.split("/")[:3]
        if phase == "report" and algo == "cispo":
            pairs += [(name, f"report/{k}/{other}") for other in ALGORITHMS if other != "cispo"]
        elif phase == "ablation":
            pairs.append((name, f"report/{k}/{algo}"))
    out = []
    for first, second in pairs:
        if second not in groups:
            continue
        a, b = _per_seed(groups[first], target), _per_seed(groups[second], target)
        diffs = {measure: difference_ci(a[measure], b[measure]) for measure in a}
        speed = verdict(diffs["steps_to_target_censored"], diffs["mean_accuracy"])
        out.append({"first": first, "second": second, "K": groups[first][0]["K"], **diffs, "verdict": speed})
    return out


def first_reaching(evals: dict[str, list], target: float) -> tuple[float, float] | None:
    """(step, seconds) of the first evaluation at or above target; None if never."""
    for step, wall, acc in zip(evals["step"], evals["wall_s"], evals["accuracy"], strict=True):
        if acc >= target:
            return float(step), float(wall)
    return None


def auc(evals: dict[str, list]) -> float:
    """Mean held-out accuracy over the evaluations after step 0: the area under the curve, steadier than
    the last point alone."""
    after = [a for s, a in zip(evals["step"], evals["accuracy"], strict=True) if s > 0]
    return statistics.fmean(after) if after else float("nan")


def _ok(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


def choose(runs: Iterable[dict[str, Any]], target: float, tuning_seed: int = TUNING_SEED) -> dict[str, Any]:
    """Per "K{k}/{algorithm}": the tuning run (phase tune, seed tuning_seed; nothing else is looked at)
    with the best score = auc; ties -> fewer steps to target (never reached counts as infinitely many),
    then the smaller lr, then the smaller clip parameters. K = 1 reuses K = 4's choice (K_REUSES)."""
    best: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for run in _ok(runs):
        if run.get("phase") != "tune" or run["seed"] != tuning_seed or run.get("overrides"):
            continue
        reached = first_reaching(run["eval"], target)
        score = auc(run["eval"])
        rank = (-score, reached[0] if reached else math.inf, run["lr"], sorted(run["loss_kwargs"].items()))
        cell = f"K{run['K']}/{run['algorithm']}"
        if cell not in best or rank < best[cell][0]:
            best[cell] = (rank, run)
    choices = {cell: _choice(rank, run) for cell, (rank, run) in sorted(best.items())}
    for k, source in K_REUSES.items():
        for cell in [c for c in choices if c.startswith(f"K{source}/")]:
            algo = cell.split("/", 1)[1]
            choices[f"K{k}/{algo}"] = {**choices[cell], "reused_from": f"K{source}"}
    return choices


def _choice(rank: tuple, run: dict[str, Any]) -> dict[str, Any]:
    steps = None if rank[1] == math.inf else rank[1]
    return {"lr": run["lr"], "loss_kwargs": dict(run["loss_kwargs"]), "score": -rank[0],
            "steps_to_target": steps, "from": run["key"]}  # fmt: skip


def cell_name(run: dict[str, Any]) -> str:
    """The summary cell of a run: report cells by (K, algorithm); tuning cells also by lr and clip; an
    ablation cell by its overrides too."""
    name = f"{run.get('phase', 'report')}/K{run['K']}/{run['algorithm']}"
    if run.get("phase") == "tune":
        name += f"/lr{run['lr']:g}/" + ",".join(f"{n}={v:g}" for n, v in sorted(run["loss_kwargs"].items()))
    if run.get("overrides"):
        name += "/" + ";".join(run["overrides"])
    return name


def _series_mean(runs: list[dict[str, Any]], key: str) -> float:
    values = [v for r in runs for v in r["series"].get(key, []) if v is not None and v == v]
    return statistics.fmean(values) if values else float("nan")


def _cell(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    reached = [first_reaching(r["eval"], target) for r in runs]
    per_seed = _per_seed(runs, target)
    first = runs[0]
    return {
        "task": first.get("task"), "phase": first.get("phase"), "K": first["K"],
        "algorithm": first["algorithm"], "lr": first["lr"], "loss_kwargs": first.get("loss_kwargs", {}),
        "interval": first.get("interval"), "overrides": first.get("overrides", []),
        "seeds": len(runs),
        "final_accuracy": mean_ci(per_seed["final_accuracy"]),
        "mean_accuracy": mean_ci(per_seed["mean_accuracy"]),
        "reached": sum(1 for x in reached if x),
        "steps_to_target": mean_ci([x[0] for x in reached if x]),
        "steps_to_target_censored": mean_ci(per_seed["steps_to_target_censored"]),
        "seconds_to_target": mean_ci([x[1] for x in reached if x]),
        "clip_frac": _series_mean(runs, "loss/clip_frac"),
        "cap_frac_high": _series_mean(runs, "ratio/cap_frac_high"),
        "abs_log_last": _series_mean(runs, "ratio/abs_log_last"),
        "ratio_p99": _series_mean(runs, "ratio/p99"),
        "entropy_last": statistics.fmean(r["series"]["entropy"][-1] or float("nan") for r in runs),
        "wall_s": statistics.fmean(r["wall_s"][-1] for r in runs),
        # DAPO's dynamic sampling draws extra rounds to replace all-equal groups: its cost in samples.
        "samples": statistics.fmean(
            sum(v for v in r["series"].get("rollout/samples_generated", []) if v is not None) for r in runs
        ),
    }  # fmt: skip


def summarise(runs: Iterable[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per cell (cell_name): means and 95% intervals over seeds; and, per cell, the ratio of its mean
    steps to target (over the seeds that reached it, and censored) to DAPO's in the same phase and K."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in _ok(runs):
        groups.setdefault(cell_name(run), []).append(run)
    cells = {name: _cell(group, target) for name, group in groups.items()}
    for cell in cells.values():
        if cell["phase"] == "tune" or cell["overrides"]:
            continue
        dapo = cells.get(f"{cell['phase']}/K{cell['K']}/dapo")
        if not dapo:
            continue
        if dapo["reached"] and cell["reached"]:
            cell["steps_ratio_vs_dapo"] = cell["steps_to_target"][0] / dapo["steps_to_target"][0]
        cell["censored_ratio_vs_dapo"] = (
            cell["steps_to_target_censored"][0] / dapo["steps_to_target_censored"][0]
        )
    order = sorted(cells.items(), key=lambda kv: (kv[1]["phase"] or "", kv[1]["K"], kv[0]))
    return {"target_accuracy": target, "cells": dict(order), "comparisons": comparisons(groups, target)}


def mean_curve(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    """Per step, the mean over runs of a series (None/NaN skipped), over the steps all runs have."""
    n = min(len(r["series"].get(key, [])) for r in runs) if runs else 0
    out = []
    for i in range(n):
        values = [r["series"][key][i] for r in runs if r["series"][key][i] is not None]
        values = [v for v in values if v == v]
        out.append(statistics.fmean(values) if values else float("nan"))
    return out
