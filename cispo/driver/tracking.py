"""Where metrics go: <run dir>/metrics.jsonl always, W&B (online or offline), a rich progress bar.

W&B mode "auto" goes online only when an API key is configured and the server answers; otherwise it
writes an offline run under <run dir>/wandb that `wandb sync` can upload later.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cispo.core.config import LoggingConfig


def _wandb_reachable(host: str = "api.wandb.ai", timeout: float = 1.5) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str) -> str:
    """logging.wandb when set explicitly; with "auto", W&B's own WANDB_MODE / WANDB_DISABLED when the
    environment sets them, else online only with an API key and a server that answers."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return "online" if has_key and _wandb_reachable() else "offline"


class Tracker:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        total_steps: int,
        resumed: bool = False,
        resume_step: int | None = None,
    ) -> None:
        """resume_step: the checkpoint's step; rows the interrupted run logged after it are dropped from
        metrics.jsonl and the samples files, since the resumed run logs those steps again."""
        self.cfg, self.run_dir = cfg, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        if resumed and resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl"):
                truncate_after(run_dir / name, resume_step)
        self._file = self.metrics_path.open("a" if resumed else "w")
        # What the run says (stage messages, progress lines) also goes here, terminal or not.
        self._log_file = (run_dir / "cli.log").open("a")
        self.wandb = None
        self.wandb_mode = resolve_wandb_mode(cfg.wandb)
        if self.wandb_mode != "disabled":
            self.wandb = self._start_wandb(run_name, config)
        self.progress = None
        # The bar only draws in a terminal; under SLURM, nohup or a pipe, plain lines every log_every steps.
        if cfg.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]CISPO"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total_steps, status="")
            self.progress.start()

    def _start_wandb(self, experiment: str, config: dict[str, Any]) -> Any:
        """W&B's own variables fill what the config leaves empty: WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR."""
        import wandb

        cfg = self.cfg
        return wandb.init(
            project=cfg.project or os.environ.get("WANDB_PROJECT") or "cispo",
            entity=cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            group=cfg.group or None,
            tags=list(cfg.tags) or None,
            name=cfg.run_name or f"{experiment}-{self.run_dir.name}",
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            config=config,
            mode=self.wandb_mode,
            resume="allow",
            id=_run_id(self.run_dir),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if "reward/mean" in metrics and step % self.cfg.log_every == 0:
            line = progress_line(step, metrics)
            if self.progress is None:
                self.print(line)
            else:
                self._write_log(line)
        if self.progress is not None:
            status = (
                f"reward {metrics.get('reward/mean', 0):.3f}  eval {metrics.get('eval/accuracy', 0):.3f}  "
                f"{metrics.get('throughput/tokens_per_s', 0):,.0f} tok/s"
            )
            self.progress.update(self.task, completed=step, status=status)

    def log_samples(self, step: int, rows: list[dict[str, Any]], table: str = "samples") -> None:
        """A W&B table of completions (and a JSONL copy next to the metrics): training samples in
        `samples`, held-out evaluation generations in `eval` (eval_samples.jsonl)."""
        name = "samples" if table == "samples" else f"{table}_samples"
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            wandb_table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({name: wandb_table}, step=step)

    def print(self, message: str) -> None:
        """A message to the terminal (above the bar, if any), and to <run dir>/cli.log."""
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)
        self._write_log(message)

    def _write_log(self, message: str) -> None:
        if self._log_file.closed:  # a message after close (a late stage message) still reaches stdout
            return
        self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._log_file.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self._file.close()
        self._log_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(step: int, metrics: dict[str, float]) -> str:
    return (
        f"step {step}: reward {metrics.get('reward/mean', float('nan')):.3f}  "
        f"eval {metrics.get('eval/accuracy', float('nan')):.3f}  "
        f"{metrics.get('throughput/tokens_per_s', 0.0):,.0f} tok/s  "
        f"{metrics.get('time/step_s', 0.0):.2f} s/step"
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _run_id(run_dir: Path) -> str:
    """A stable W&B id per run directory, so a resumed run continues the same W&B run."""
    path = run_dir / ".wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def truncate_after(path: Path, step: int) -> None:
    """Keeps the JSONL rows with "step" <= step (and any unparsable tail a kill cut short goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path) -> Path:
    """A PNG of reward, eval accuracy and response length against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [
        ("reward/mean", "train reward"),
        ("eval/accuracy", "held-out accuracy"),
        ("response_length/mean", "response length (tokens)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if key == "eval/accuracy":
            points = [(r["step"], r[key]) for r in records if r.get("eval/ran")]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if key == "eval/accuracy" else None, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
