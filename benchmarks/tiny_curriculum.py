"""Curves of an `experiment=tiny_curriculum` run with its stage transitions marked.

    python benchmarks/tiny_curriculum.py [runs/tiny_curriculum]

Reads <run dir>/metrics.jsonl; writes docs/tiny_curriculum.png and benchmarks/results/tiny_curriculum.json
(the step of each advance with the signals that triggered it, the reward per stage, the wall time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load(run_dir: Path) -> list[dict]:
    """Step rows, each with "ran_at": the budget its rollout had. A row logs the curriculum after that
    step's observation, so the row of the step that decided an advance already shows the new stage."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("step", 0) >= 1 and "curriculum/stage" in r]
    for prev, row in zip([None, *rows], rows):
        row["ran_at"] = prev["curriculum/budget"] if prev else row["curriculum/budget"]
    return rows


def summarise(rows: list[dict]) -> dict:
    advances, stages = [], {}
    for row in rows:
        if row["curriculum/budget"] != row["ran_at"]:
            # Decided at the end of this step, on its signals; the new budget applies from the next step.
            advances.append(
                {
                    "decided_at_step": row["step"],
                    "from_budget": row["ran_at"],
                    "to_budget": row["curriculum/budget"],
                    **{k: row.get(k) for k in ("response_length/p99", "curriculum/p99_fraction",
                                                "curriculum/length_streak", "curriculum/perplexity",
                                                "curriculum/perplexity_change")},
                }
            )  # fmt: skip
    for row in rows:
        stages.setdefault(int(row["ran_at"]), []).append(row)
    per_stage = {}
    for budget, rs in stages.items():
        evals = [r["eval/accuracy"] for r in rs if r.get("eval/ran")]
        last = rs[-min(5, len(rs)) :]
        per_stage[budget] = {
            "steps": [rs[0]["step"], rs[-1]["step"]],
            "reward_first5": sum(r["reward/mean"] for r in rs[:5]) / len(rs[:5]),
            "reward_last5": sum(r["reward/mean"] for r in last) / len(last),
            "truncated_first5": sum(r["rollout/finish_length"] for r in rs[:5]) / len(rs[:5]),
            "truncated_last5": sum(r["rollout/finish_length"] for r in last) / len(last),
            "eval_accuracy": evals,
        }
    return {
        "steps": rows[-1]["step"],
        "rl_wall_s": sum(r.get("time/step_s", 0.0) for r in rows),
        "advances": advances,
        "per_stage": per_stage,
    }


def plot(rows: list[dict], summary: dict, out: Path) -> None:
    steps = [r["step"] for r in rows]
    panels = [
        ("reward and held-out accuracy", [("reward/mean", "train reward"), ("eval/accuracy", "held-out")]),
        ("response length (tokens)", [("ran_at", "budget"), ("response_length/p99", "p99"),
                                      ("response_length/mean", "mean")]),
        ("generation perplexity", [("curriculum/perplexity", "perplexity")]),
        ("truncated by the budget", [("rollout/finish_length", "fraction cut off")]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            if key == "eval/accuracy":
                pts = [(r["step"], r[key]) for r in rows if r.get("eval/ran")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", linewidth=1.2, label=label)
            else:
                style = {"drawstyle": "steps-mid", "color": "black"} if key == "ran_at" else {}
                ax.plot(steps, [r.get(key, float("nan")) for r in rows], linewidth=1.2, label=label, **style)
        for a in summary["advances"]:
            ax.axvline(a["decided_at_step"] + 0.5, color="red", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    text = ", ".join(f"{int(a['from_budget'])}->{int(a['to_budget'])} after step {a['decided_at_step']}"
                     for a in summary["advances"])  # fmt: skip
    fig.suptitle(f"experiment=tiny_curriculum: stage transitions (red) {text or 'none'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "runs" / "tiny_curriculum")
    rows = load(run_dir)
    summary = summarise(rows)
    plot(rows, summary, REPO / "docs" / "tiny_curriculum.png")
    out = REPO / "benchmarks" / "results" / "tiny_curriculum.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
