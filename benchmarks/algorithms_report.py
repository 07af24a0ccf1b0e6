"""The tables and the figure of benchmarks/algorithms.py: every table names each cell's lr and the effective
interval [lo, hi] of its weight (CISPO) or ratio (DAPO, GRPO) after the offset convention."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.algorithms_stats import ALGORITHMS, mean_curve


def _ci(ms: tuple[float, float] | list[float], p: int = 3) -> str:
    mean, half = ms
    if mean != mean:
        return "-"
    return f"{mean:.{p}f}" + ("" if half != half else f" ± {half:.{p}f}")


def _num(value: float | None, p: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{p}f}"


def interval(cell: dict[str, Any]) -> str:
    bounds = cell.get("interval")
    return "-" if not bounds else f"[{bounds[0]:g}, {bounds[1]:g}]"


def clip(loss_kwargs: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in sorted(loss_kwargs.items())) or "-"


def cell_table(cells: list[dict[str, Any]]) -> list[str]:
    """The main table: means ± 95% interval half-widths (Student t) over seeds."""
    lines = [
        "| K | algorithm | lr | clip | [lo, hi] | seeds | final accuracy | mean accuracy | reached | "
        "steps to target (reached) | steps to target (censored) | steps ratio vs DAPO | "
        "censored ratio vs DAPO | cap frac high | mean abs log r (last minibatch) | entropy (last step) | "
        "samples | RL wall s |",
        "|" + "---|" * 18,
    ]
    for cell in cells:
        lines.append(
            f"| {cell['K']} | {cell['algorithm']}{_overrides(cell)} | {cell['lr']:g} | "
            f"{clip(cell['loss_kwargs'])} | {interval(cell)} | {cell['seeds']} | "
            f"{_ci(cell['final_accuracy'])} | {_ci(cell['mean_accuracy'])} | "
            f"{cell['reached']}/{cell['seeds']} | "
            f"{_ci(cell['steps_to_target'], 1)} | {_ci(cell['steps_to_target_censored'], 1)} | "
            f"{_num(cell.get('steps_ratio_vs_dapo'), 2)} | {_num(cell.get('censored_ratio_vs_dapo'), 2)} | "
            f"{_num(cell['cap_frac_high'])} | {_num(cell['abs_log_last'])} | {_num(cell['entropy_last'])} | "
            f"{cell['samples']:.0f} | {cell['wall_s']:.0f} |"
        )
    return lines


def _overrides(cell: dict[str, Any]) -> str:
    return f" + {' '.join(cell['overrides'])}" if cell.get("overrides") else ""


def choice_table(choices: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| K | algorithm | chosen lr | chosen clip | [lo, hi] | tuning score (mean accuracy) | note |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, choice in sorted(choices.items(), key=lambda kv: (int(kv[0].split("/")[0][1:]), kv[0])):
        k, algo = name.split("/")
        bounds = choice.get("interval")
        note = f"reuses the {choice['reused_from']} choice" if "reused_from" in choice else ""
        lines.append(
            f"| {k[1:]} | {algo} | {choice['lr']:g} | {clip(choice['loss_kwargs'])} | "
            f"{'-' if not bounds else f'[{bounds[0]:g}, {bounds[1]:g}]'} | {choice['score']:.3f} | {note} |"
        )
    return lines


def comparison_table(comparisons: list[dict[str, Any]], phase: str) -> list[str]:
    """First minus second, mean difference ± its 95% Welch half-width over seeds; the verdict reads the
    steps to target (censored) and the mean accuracy: faster or slower only where an interval excludes 0
    (algorithms_stats.verdict)."""
    lines = ["| K | first | second | steps to target (censored) | mean accuracy | final accuracy | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in comparisons:
        if not c["first"].startswith(phase + "/"):
            continue
        first = c["first"].split("/", 2)[2].replace("/", " + ", 1)
        lines.append(
            f"| {c['K']} | {first} | {c['second'].split('/')[2]} | "
            f"{_signed(c['steps_to_target_censored'], 1)} | {_signed(c['mean_accuracy'])} | "
            f"{_signed(c['final_accuracy'])} | {c['verdict']} |"
        )
    return lines


def _signed(ms: tuple[float, float] | list[float], p: int = 3) -> str:
    mean, half = ms
    if mean != mean:
        return "-"
    return f"{mean:+.{p}f}" + ("" if half != half else f" ± {half:.{p}f}")


AGAINST = {"report": "CISPO minus each tuned baseline", "ablation": "Ablation minus the reported CISPO"}


def report_markdown(result: dict[str, Any]) -> str:
    """The whole Markdown report of one task: reported cells, the ablation, the choices, the tuning grid."""
    cells = list(result["summary"].get("cells", {}).values())
    target = result["summary"].get("target_accuracy", result.get("target"))
    out = [f"{result.get('description', '')}; target held-out accuracy {target}", ""]
    out += ["Intervals are 95% (Student t, df = seeds - 1) over seeds; 'reached' seeds only in 'steps to "
            "target (reached)', the others counted as their total steps in 'censored'.", ""]  # fmt: skip
    for phase, title in (("report", "Reported matrix"), ("ablation", "Ablation"), ("tune", "Tuning runs")):
        chosen = [c for c in cells if c["phase"] == phase]
        if chosen:
            out += [f"### {title}", "", *cell_table(chosen), ""]
        if chosen and phase in AGAINST and result["summary"].get("comparisons"):
            out += [f"### {AGAINST[phase]} (95% Welch intervals over seeds)", "",
                    *comparison_table(result["summary"]["comparisons"], phase), ""]  # fmt: skip
        if phase == "report" and result.get("choices"):
            out += ["### Chosen on the tuning seed", "", *choice_table(result["choices"]), ""]
    return "\n".join(out).rstrip("\n") + "\n"


AXES = (
    ("step", "held-out accuracy"),
    ("RL wall time (s, mean over seeds)", "held-out accuracy"),
    ("step", "entropy (mean over seeds)"),
)


COLOURS = {"cispo": "tab:blue", "grpo": "tab:orange", "dapo": "tab:green"}  # the same in every panel


def _style(algo: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """An algorithm's colour in every column; an ablation dashed, in its algorithm's colour."""
    return {"color": COLOURS.get(algo, "tab:gray"), "linestyle": "--" if overrides else "-"}


def _short(overrides: tuple[str, ...]) -> str:
    """``algorithm.loss_kwargs.token_mask=true`` -> ``token_mask=true``: legends stay narrow."""
    short = [f"{name.rsplit('.', 1)[-1]}={value}" for name, _, value in (o.partition("=") for o in overrides)]
    return f" + {' '.join(short)}" if overrides else ""


def _band(ax: Any, xs: list[float], ys: list[list[float]], label: str, style: dict[str, Any]) -> None:
    mean = [statistics.fmean(y) for y in ys]
    std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
    ax.plot(xs, mean, marker="o", markersize=3, label=label, **style)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    color=style["color"])  # fmt: skip


def plot(runs: list[dict[str, Any]], title: str, out: Path) -> None:
    """The reported matrix and the ablation, one column per K: held-out accuracy against steps and against
    RL wall time (mean ± std over seeds) and the policy's entropy per step (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if "error" not in r and r.get("phase") in ("report", "ablation")]
    ks = sorted({r["K"] for r in done})
    if not ks:
        return
    lines = sorted({(r["algorithm"], tuple(r.get("overrides", []))) for r in done})
    lines.sort(key=lambda line: (ALGORITHMS.index(line[0]) if line[0] in ALGORITHMS else 99, line[1]))
    fig, axes = plt.subplots(3, len(ks), figsize=(5 * len(ks), 10), squeeze=False)
    for col, k in enumerate(ks):
        for algo, overrides in lines:
            cell = [r for r in done if r["K"] == k and r["algorithm"] == algo
                    and tuple(r.get("overrides", [])) == overrides]  # fmt: skip
            if not cell:
                continue
            n = min(len(r["eval"]["accuracy"]) for r in cell)
            accs = [[r["eval"]["accuracy"][i] for r in cell] for i in range(n)]
            label, style = (
                f"{algo}{_short(overrides)} lr {cell[0]['lr']:g} ({len(cell)} seeds)",
                _style(algo, overrides),
            )
            for row, axis in enumerate(("step", "wall_s")):
                xs = [statistics.fmean(r["eval"][axis][i] for r in cell) for i in range(n)]
                _band(axes[row][col], xs, accs, label, style)
            entropy = mean_curve(cell, "entropy")
            axes[2][col].plot(cell[0]["steps"][: len(entropy)], entropy, label=label, **style)
        for row, (xlabel, ylabel) in enumerate(AXES):
            ax = axes[row][col]
            ax.set_title(f"K = {k} updates per batch")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
