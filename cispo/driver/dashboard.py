"""The W&B workspace view of a cispo project, built in code.

`view_spec(loss)` is a plain object (sections of line panels: y keys or a key regex against one x axis),
built and tested without W&B; `to_workspace` turns it into a `wandb_workspaces` Workspace only when it is
saved. A run that is online creates the view when its project lacks one; `cispo-dashboard --project P`
creates or updates it for an existing project:

    cispo-dashboard --project cispo [--entity team] [--loss cispo] [--name "cispo health"]

Panels name the metric keys the runs log (metrics.jsonl keys, plus the W&B-only step axes of
cispo/driver/wandb_run.py). `NOT_LOGGED_YET` lists the keys a panel already shows that no stage logs
today (the README lists them too): their panels stay empty until a stage logs them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

# The step axes (logged to W&B only; metrics.jsonl keys are unchanged).
TRAIN_STEP, ROLLOUT_STEP, EVAL_STEP = "train/step", "rollout/step", "eval/step"
SAMPLES_SEEN, TOKENS_SEEN, WALL_TIME = "progress/samples_seen", "progress/tokens_seen", "progress/wall_time_s"
AXES = (TRAIN_STEP, ROLLOUT_STEP, EVAL_STEP, SAMPLES_SEEN, TOKENS_SEEN, WALL_TIME)
VIEW_NAME = "cispo health"
# A fixed internal name, so the view is found again and updated instead of duplicated.
VIEW_ID = "nw-cispo-health-v"

# Keys a panel shows that no stage logs yet ({loss} is the loss prefix: cispo, grpo, ...).
NOT_LOGGED_YET = (
    "{loss}/is_weight_p50",
    "{loss}/is_weight_p90",
    "{loss}/is_weight_p99",
    "time/worker_idle_s",
    "time/learner_idle_s",
    "moe/layer_<i>/load_max_over_mean",
    "moe/router_entropy",
    "moe/routing_mismatch_frac",
)


@dataclass(frozen=True)
class Panel:
    """A line plot: `y` keys (or every key matching `regex`) against the `x` axis."""

    title: str
    y: tuple[str, ...] = ()
    x: str = TRAIN_STEP
    regex: str = ""

    def __post_init__(self) -> None:
        if not self.y and not self.regex:
            raise ValueError(f"panel {self.title!r}: give y keys or a regex")


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]
    is_open: bool = True


@dataclass(frozen=True)
class ViewSpec:
    name: str
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def keys(self) -> set[str]:
        """Every y key a panel names (regex panels aside)."""
        return {key for s in self.sections for p in s.panels for key in p.y}


def view_spec(loss: str = "cispo", name: str = VIEW_NAME) -> ViewSpec:
    """The curated view; `loss` is the prefix of the loss metrics (`algorithm.loss`, or `actor` for a
    loss given by dotted path)."""
    p = loss
    learning = Section(
        "learning",
        (
            Panel("train reward", ("reward/mean", "reward/std"), ROLLOUT_STEP),
            Panel("held-out accuracy", ("eval/accuracy",), EVAL_STEP),
            Panel("reward vs samples seen", ("reward/mean",), SAMPLES_SEEN),
            Panel("zero-variance groups", ("advantage/zero_variance_frac",)),
        ),
    )
    health = Section(
        f"{p.upper()} health",
        (
            Panel(
                "IS weight",
                (
                    f"{p}/is_weight_mean",
                    f"{p}/is_weight_p50",
                    f"{p}/is_weight_p90",
                    f"{p}/is_weight_p99",
                    f"{p}/is_weight_max",
                ),
            ),  # fmt: skip
            Panel("clip fractions", (f"{p}/clip_frac_low", f"{p}/clip_frac_high", f"{p}/clip_frac")),
            Panel(
                "train/infer log-prob mismatch",
                ("train_infer/logprob_max_abs_diff", "train_infer/logprob_corr"),
            ),  # fmt: skip
            Panel("entropy", ("entropy",)),
            Panel("approx KL", (f"{p}/approx_kl",)),
            Panel("grad norm", ("actor/grad_norm",)),
        ),
    )
    length = Section(
        "length and curriculum",
        (
            Panel("response length", ("response_length/mean", "response_length/p99"), ROLLOUT_STEP),
            Panel("budget and stage", ("curriculum/budget", "curriculum/stage")),
            Panel(
                "truncation and repetition stops",
                ("rollout/finish_length", "rollout/finish_repetition"),
                ROLLOUT_STEP,
            ),  # fmt: skip
        ),
    )
    return ViewSpec(name, (learning, health, length, _throughput(), _rewards(), _moe()))


def _throughput() -> Section:
    return Section(
        "throughput",
        (
            Panel("tokens/s", ("throughput/tokens_per_s", "throughput/tokens_per_s_per_device")),
            Panel("step time", ("time/step_s", "time/rollout_s", "time/train_s", "time/weight_sync_s")),
            Panel("weight sync (s)", ("time/weight_sync_s",)),
            Panel("idle (s)", ("time/worker_idle_s", "time/learner_idle_s")),
            Panel("tokens seen vs wall time", (TOKENS_SEEN,), WALL_TIME),
        ),
    )


def _rewards() -> Section:
    return Section(
        "rewards",
        (
            Panel("per-reward means", regex=r"^reward/[^/]+/mean$", x=ROLLOUT_STEP),
            Panel("errors and timeouts", ("reward/errors", "reward/timeouts"), ROLLOUT_STEP),
            Panel("per-reward errors", regex=r"^reward/[^/]+/(errors|timeouts)$", x=ROLLOUT_STEP),
        ),
    )


def _moe() -> Section:
    return Section(
        "MoE health",
        (
            Panel("expert load (max/mean tokens per expert)", regex=r"^moe/layer_\d+/load_max_over_mean$"),
            Panel("router entropy", ("moe/router_entropy",)),
            Panel("router aux loss", ("actor/router_aux_loss",)),
            Panel("engine vs learner routing differs", ("moe/routing_mismatch_frac",)),
        ),
        is_open=False,
    )


def to_workspace(spec: ViewSpec, entity: str, project: str) -> Any:
    """The spec as a wandb_workspaces Workspace (imported here: only a save needs the package)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(p: Panel) -> Any:
        if p.regex:
            return wr.LinePlot(title=p.title, x=p.x, metric_regex=p.regex)
        return wr.LinePlot(title=p.title, x=p.x, y=list(p.y))

    sections = [
        ws.Section(name=s.name, panels=[panel(p) for p in s.panels], is_open=s.is_open) for s in spec.sections
    ]
    workspace = ws.Workspace(entity=entity, project=project, name=spec.name, sections=sections)
    workspace._internal_name = VIEW_ID  # a stable name: saving again updates this view
    return workspace


def save_view(spec: ViewSpec, entity: str, project: str, *, replace: bool = True) -> str:
    """Creates the view, or updates it when the project has one (`replace`; without it an existing view,
    which a user may have edited, is left alone). Returns its URL, or "" when it was left alone."""
    from wandb_workspaces.workspaces import internal

    workspace = to_workspace(spec, entity, project)
    try:
        existing = internal.View.from_name(entity, project, VIEW_ID)
    except ValueError:  # the project has no such view yet (or no runs)
        existing = None
    if existing is not None:
        if not replace:
            return ""
        workspace._internal_id = existing.id
    return workspace.save().url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cispo-dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the W&B project of the runs")
    parser.add_argument("--entity", default="", help="default: $WANDB_ENTITY, else your default entity")
    parser.add_argument("--loss", default="cispo", help="the loss metrics' prefix (algorithm.loss)")
    parser.add_argument("--name", default=VIEW_NAME, help="the view's display name")
    args = parser.parse_args(argv)
    import os

    import wandb

    entity = args.entity or os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    if not entity:
        print("cispo-dashboard: no entity (pass --entity or set WANDB_ENTITY)", file=sys.stderr)
        return 2
    url = save_view(view_spec(args.loss, args.name), entity, args.project)
    print(f"view {args.name!r} saved: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
