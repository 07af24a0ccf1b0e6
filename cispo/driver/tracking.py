"""Where metrics go: <run dir>/metrics.jsonl always, W&B (online or offline), a rich progress bar.

W&B mode "auto" goes online only when an API key is configured and the server answers (the server of
WANDB_BASE_URL, or of `wandb login --host`, else the public one); otherwise it writes an offline run under
<run dir>/wandb that `wandb sync` can upload later. cispo/driver/wandb_run.py holds the W&B run itself.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cispo.core.config import LoggingConfig
from cispo.driver.wandb_run import StartOptions, WandbRun

PUBLIC_WANDB = "https://api.wandb.ai"


def wandb_base_url() -> str:
    """The W&B server: WANDB_BASE_URL, else the base_url `wandb login --host` saved, else the public one."""
    url = os.environ.get("WANDB_BASE_URL", "")
    if not url:
        config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
        parser = configparser.ConfigParser()
        try:
            parser.read(config_dir / "settings")
            url = parser.get("default", "base_url", fallback="")
        except configparser.Error:
            url = ""
    return (url or PUBLIC_WANDB).rstrip("/")


def _wandb_reachable(base_url: str | None = None, timeout: float = 1.5) -> bool:
    """Whether the W&B server answers over HTTP(S) (any status counts: a 404 is an answer); proxies from
    the environment apply, as they do for wandb itself."""
    try:
        urllib.request.urlopen(f"{base_url or wandb_base_url()}/healthz", timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, unresolvable, timed out; a malformed URL
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
        dropped = 0
        if resumed and resume_step is not None:
            dropped = truncate_after(run_dir / "metrics.jsonl", resume_step)
            for name in ("samples.jsonl", "eval_samples.jsonl", "batches.jsonl"):
                truncate_after(run_dir / name, resume_step)
        self._file = self.metrics_path.open("a" if resumed else "w")
        # What the run says (stage messages, progress lines) also goes here, terminal or not.
        self._log_file = (run_dir / "cli.log").open("a")
        self.progress = None  # set before W&B starts: its messages go through print()
        self.wandb: WandbRun | None = None
        self.wandb_mode = resolve_wandb_mode(cfg.wandb)
        if self.wandb_mode != "disabled":
            kept = read_metrics(self.metrics_path) if resumed and self.metrics_path.exists() else []
            self.wandb = self._start_wandb(
                run_name, config, resume_step if resumed else None, dropped > 0, kept
            )
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

    def _start_wandb(
        self,
        experiment: str,
        config: dict[str, Any],
        resume_step: int | None,
        dropped: bool,
        kept: list[dict],
    ) -> WandbRun:
        """W&B's own variables fill what the config leaves empty: WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR.
        A run directory's W&B runs (a resumed segment that could not rewind included) share a group."""
        cfg = self.cfg
        name = cfg.run_name or f"{experiment}-{self.run_dir.name}"
        init = {
            "project": cfg.project or os.environ.get("WANDB_PROJECT") or "cispo",
            "entity": cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            "group": cfg.group or os.environ.get("WANDB_RUN_GROUP") or name,
            "tags": list(cfg.tags) or None,
            "name": name,
            "dir": os.environ.get("WANDB_DIR") or str(self.run_dir),
        }
        options = StartOptions(
            self.wandb_mode, init, config, resume_step, dropped, cfg.wandb_artifacts, cfg.wandb_view
        )
        return WandbRun(self.run_dir, options, kept, self.print)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(step, metrics)
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

    def log_batch(self, step: int, groups: list[int]) -> None:
        """The data-stream indices of the groups a step trained on, in the batch's order (batches.jsonl)."""
        with (self.run_dir / "batches.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "groups": groups}) + "\n")

    def log_samples(self, step: int, rows: list[dict[str, Any]], table: str = "samples") -> None:
        """A W&B table of completions (and a JSONL copy next to the metrics): training samples in
        `samples`, held-out evaluation generations in `eval` (eval_samples.jsonl)."""
        name = "samples" if table == "samples" else f"{table}_samples"
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None and rows:
            self.wandb.log_table(step, name, rows)

    def log_directory(self, path: Path, kind: str, step: int) -> None:
        """A checkpoint or the HF export as a W&B artifact (with logging.wandb_artifacts; else nothing)."""
        if self.wandb is not None:
            self.wandb.log_directory(path, kind, step)

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


def truncate_after(path: Path, step: int) -> int:
    """Keeps the JSONL rows with "step" <= step (and any unparsable tail a kill cut short goes too);
    returns how many rows went."""
    if not path.exists():
        return 0
    kept, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return sum(1 for line in lines if line.strip()) - len(kept)


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
