"""The W&B side of a run: step axes, summaries, the rewind on resume, artifacts, the workspace view.

Step axes (`define_metric`, W&B only: metrics.jsonl keys do not change). `_step` stays the train step (one
row per step); besides it every row carries `train/step`, `rollout/step` (the rollout batch a row's
samples came from; the same number as the train step while rollout runs at most one step ahead) and, in
rows where an evaluation ran, `eval/step`. Training metrics plot against `train/step`, rollout metrics
(`rollout/*`, `reward/*`, `response_length/*`) against `rollout/step`, evaluations (`eval/*`) against
`eval/step`; `progress/samples_seen`, `progress/tokens_seen` (generated tokens) and `progress/wall_time_s`
(the sum of the steps' time/step_s) are there to pick as x axes. `eval/accuracy` goes to W&B only in rows
where an evaluation ran (metrics.jsonl repeats the last value in every row).

Summaries: `eval/best_accuracy` and `eval/best_step` (the best held-out accuracy so far and its step),
`eval/final_accuracy` (the run's final evaluation); every other key's summary is its last value.

Resume. A resumed run whose interrupted segment logged rows after the checkpoint must not re-log those
steps into the same W&B run (W&B drops steps that are not above the last one). Online, the run is rewound
to the checkpoint (`resume_from=<id>?_step=<checkpoint+1>`: W&B archives the rows after it). Where that is
refused (offline, a server without rewind, e.g. self-managed) a new W&B run `<id>-r<checkpoint>` continues
in the same group, its config naming the run and step it continues (`cispo_resume`); the interrupted
segment keeps its rows after the checkpoint, superseded but never deleted. Each W&B run's steps increase.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cispo.driver.dashboard import (
    AXES,
    EVAL_STEP,
    ROLLOUT_STEP,
    SAMPLES_SEEN,
    TOKENS_SEEN,
    TRAIN_STEP,
    WALL_TIME,
    save_view,
    view_spec,
)

ROLLOUT_PREFIXES = ("rollout/", "reward/", "response_length/")
PER_DEVICE = "throughput/tokens_per_s_per_device"
FLUSH_S = 1.0


def axis_of(key: str) -> str:
    """The step axis a metric key plots against."""
    if key.startswith("eval/"):
        return EVAL_STEP
    if key.startswith(ROLLOUT_PREFIXES):
        return ROLLOUT_STEP
    return TRAIN_STEP


@dataclass
class Progress:
    """The cumulative x axes and the best evaluation, rebuilt from metrics.jsonl rows on resume."""

    samples: float = 0.0
    tokens: float = 0.0
    wall: float = 0.0
    best_accuracy: float = -math.inf
    best_step: int = -1

    def add(self, step: int, row: dict[str, Any]) -> bool:
        """Counts one row in; True when it holds a new best evaluation."""
        self.samples += _number(row.get("rollout/samples_generated"))
        self.tokens += _number(row.get("rollout/new_tokens"))
        self.wall += _number(row.get("time/step_s"))
        accuracy = row.get("eval/accuracy")
        if row.get("eval/ran") and isinstance(accuracy, (int, float)) and accuracy > self.best_accuracy:
            self.best_accuracy, self.best_step = float(accuracy), step
            return True
        return False


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def device_count(config: dict[str, Any]) -> int:
    """The accelerators a run holds (cluster.learner_gpus + rollout_gpus, else num_nodes x gpus_per_node),
    1 for a CPU run: the divisor of tokens/s per device."""
    cluster = config.get("cluster") or {}
    stated = int(cluster.get("learner_gpus", 0) or 0) + int(cluster.get("rollout_gpus", 0) or 0)
    allocated = int(cluster.get("num_nodes", 1) or 1) * int(cluster.get("gpus_per_node", 0) or 0)
    return max(1, stated or allocated)


def loss_prefix_of(config: dict[str, Any]) -> str:
    loss = str((config.get("algorithm") or {}).get("loss", "cispo"))
    return loss if loss.isidentifier() else "actor"


class RunIds:
    """<run dir>/.wandb_id: the base W&B id; .wandb_runs: every W&B run id this directory used, in order
    (the last is the one that holds the newest rows)."""

    def __init__(self, run_dir: Path) -> None:
        self.base_path, self.runs_path = run_dir / ".wandb_id", run_dir / ".wandb_runs"
        if not self.base_path.exists():
            self.base_path.write_text(uuid.uuid4().hex[:12])
        self.base = self.base_path.read_text().strip()

    def used(self) -> list[str]:
        if not self.runs_path.exists():
            return [self.base]
        return [line for line in self.runs_path.read_text().split() if line] or [self.base]

    def record(self, run_id: str) -> None:
        if self.runs_path.exists() and self.used()[-1] == run_id:
            return
        with self.runs_path.open("a") as f:
            f.write(f"{run_id}\n")

    def fork_id(self, step: int) -> str:
        used, candidate, n = set(self.used()), f"{self.base}-r{step}", 2
        while candidate in used:
            candidate, n = f"{self.base}-r{step}-{n}", n + 1
        return candidate


@dataclass
class StartOptions:
    """What wandb.init needs besides the resume decision (Tracker fills it from the logging config)."""

    mode: str
    init: dict[str, Any]  # project, entity, group, tags, name, dir
    config: dict[str, Any]
    resume_step: int | None = None  # the checkpoint's step, on a resume
    rows_after_checkpoint: bool = False  # the interrupted segment logged steps after the checkpoint
    artifacts: bool = False
    view: bool = True


def flush_settings() -> dict[str, Any]:
    """W&B writes the run's .wandb file every 15 s by default, and a driver killed with -9 takes what
    was not written with it (metrics.jsonl keeps it): every FLUSH_S instead, unless
    WANDB__TRANSACTION_LOG_FLUSH_INTERVAL says otherwise (or this W&B has no such setting)."""
    import wandb

    field = "x_transaction_log_flush_interval"
    if "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL" in os.environ or field not in wandb.Settings.model_fields:
        return {}
    return {"settings": wandb.Settings(**{field: FLUSH_S})}


class WandbRun:
    """One W&B run (or the next segment of one) with the axes, summaries and artifacts described above."""

    def __init__(
        self, run_dir: Path, options: StartOptions, kept_rows: list[dict], say: Callable[[str], None]
    ) -> None:
        self.ids, self.say, self.options = RunIds(run_dir), say, options
        self.progress = Progress()
        for row in kept_rows:
            self.progress.add(int(row.get("step", 0)), row)
        self.devices = device_count(options.config)
        self.defined: set[str] = set()
        self.run = self._start()
        for axis in AXES:
            self.run.define_metric(axis)
        if self.progress.best_step >= 0:  # a resumed segment starts with the best evaluation so far
            self._best()
        if options.mode == "online" and options.view:
            self._create_view()

    def _start(self) -> Any:
        import wandb

        opts, active = self.options, self.ids.used()[-1]
        kwargs = {**opts.init, "mode": opts.mode, "config": opts.config, **flush_settings()}
        step = opts.resume_step
        if step is None or not opts.rows_after_checkpoint:
            run = wandb.init(**kwargs, id=active, resume="allow")
            self.ids.record(active)
            return run
        if opts.mode == "online":
            try:
                run = wandb.init(**kwargs, resume_from=f"{active}?_step={step + 1}")
                self.say(f"W&B: run {active} rewound to step {step} (its later rows are archived)")
                return run
            except Exception as exc:  # a server without rewind (self-managed), or rewind not enabled
                self.say(f"W&B: rewinding run {active} to step {step} failed ({exc}); a new run continues")
        new = self.ids.fork_id(step)
        kwargs["config"] = {**opts.config, "cispo_resume": {"from_run": active, "from_step": step}}
        kwargs["name"] = f"{kwargs.get('name')}-r{step}"
        run = wandb.init(**kwargs, id=new, resume="allow")
        self.ids.record(new)
        self.say(
            f"W&B: continuing in run {new} (same group); the rows of {active} after step {step} are "
            f"superseded by it, not deleted"
        )
        return run

    def _create_view(self) -> None:
        """The curated view, when the project has none yet (never replacing one a user may have edited)."""
        try:
            url = save_view(view_spec(loss_prefix_of(self.options.config)), self.run.entity, self.run.project,
                            replace=False)  # fmt: skip
            if url:
                self.say(f"W&B: workspace view created: {url}")
        except Exception as exc:  # a view is a convenience: it never stops a run
            self.say(f"W&B: workspace view not created ({type(exc).__name__}: {exc})")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = dict(metrics)
        ran_eval = bool(metrics.get("eval/ran"))
        if not ran_eval:
            row.pop("eval/accuracy", None)  # metrics.jsonl repeats the last one; W&B gets evaluations only
        new_best = self.progress.add(step, metrics)
        if "throughput/tokens_per_s" in row and isinstance(row["throughput/tokens_per_s"], (int, float)):
            row[PER_DEVICE] = row["throughput/tokens_per_s"] / self.devices
        for key in row:
            if key not in self.defined and key not in AXES:
                self.run.define_metric(key, step_metric=axis_of(key))
                self.defined.add(key)
        row[TRAIN_STEP] = step
        if any(k.startswith(ROLLOUT_PREFIXES) for k in row):
            row[ROLLOUT_STEP] = step
        if ran_eval:
            row[EVAL_STEP] = step
        row.update({SAMPLES_SEEN: self.progress.samples, TOKENS_SEEN: self.progress.tokens,
                    WALL_TIME: self.progress.wall})  # fmt: skip
        self.run.log(row, step=step)
        if new_best:
            self._best()
        if metrics.get("eval/final") and "eval/accuracy" in metrics:
            self.run.summary["eval/final_accuracy"] = metrics["eval/accuracy"]

    def _best(self) -> None:
        self.run.summary["eval/best_accuracy"] = self.progress.best_accuracy
        self.run.summary["eval/best_step"] = self.progress.best_step

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def log_directory(self, path: Path, kind: str, step: int) -> None:
        """A directory (a checkpoint, the HF export) as a W&B artifact `<base id>-<kind>`, aliased
        `step-<step>` and `latest`; only with logging.wandb_artifacts."""
        if not self.options.artifacts or not path.is_dir():
            return
        import wandb

        artifact = wandb.Artifact(f"{self.ids.base}-{kind}", type=kind, metadata={"step": step})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def finish(self) -> None:
        self.run.finish()
