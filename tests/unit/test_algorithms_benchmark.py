"""benchmarks/algorithms.py: the curves it reads from metrics.jsonl and the summary it makes, by hand;
and the committed result, so that a later change cannot silently drop the benchmark (its schema and
seed counts are checked, not its values)."""

import json
from pathlib import Path

import pytest

from benchmarks import algorithms as bench

REPO = Path(__file__).resolve().parents[2]


def _metrics(tmp_path: Path, accs: dict[int, float], algo: str = "cispo") -> Path:
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/ran": 1, "warmstart/accuracy": 0.2}]
    for step in range(1, 5):
        row = {"step": step, "reward/mean": 0.1 * step, "time/step_s": 2.0, "entropy": 1.0,
               f"{algo}/clip_frac": 0.25 * step, f"{algo}/is_weight_mean": 1.0}  # fmt: skip
        if step in accs:
            row.update({"eval/ran": 1, "eval/accuracy": accs[step]})
        rows.append(row)
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_curves_by_hand(tmp_path):
    got = bench.curves(_metrics(tmp_path, {2: 0.3, 4: 0.5}), "cispo")
    assert got["steps"] == [1, 2, 3, 4]
    assert got["wall_s"] == [2.0, 4.0, 6.0, 8.0]  # the sum of step times: start-up and eval excluded
    assert got["eval"] == {"step": [0, 2, 4], "wall_s": [0.0, 4.0, 8.0], "accuracy": [0.2, 0.3, 0.5]}
    assert got["warmstart_accuracy"] == 0.2
    assert got["series"]["loss/clip_frac"] == [0.25, 0.5, 0.75, 1.0]
    assert got["series"]["loss/grad_zeroed_frac"] == [None] * 4  # not a CISPO metric


def test_curves_refuse_a_run_without_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "eval/accuracy": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no training steps"):
        bench.curves(path, "cispo")


def _run(algo: str, seed: int, accs: list[float]) -> dict:
    steps = [0, 5, 10, 15][: len(accs)]
    return {"algorithm": algo, "K": 4, "seed": seed, "lr": 1e-4,
            "eval": {"step": steps, "wall_s": [2.0 * s for s in steps], "accuracy": accs},
            "wall_s": [30.0],
            "series": {"loss/clip_frac": [0.1, 0.3], "rollout/samples_generated": [128, 64]}}  # fmt: skip


def test_summary_by_hand():
    runs = [
        _run("cispo", 0, [0.2, 0.4, 0.5, 0.6]),  # reaches 0.4 at step 5
        _run("cispo", 1, [0.2, 0.3, 0.45, 0.5]),  # at step 10
        _run("dapo", 0, [0.2, 0.3, 0.3, 0.45]),  # at step 15
        _run("dapo", 1, [0.2, 0.2, 0.3, 0.35]),  # never
        {"algorithm": "grpo", "K": 4, "seed": 0, "lr": 1e-4, "error": "exit 1"},
    ]
    summary = bench.summarise(runs, target=0.4)
    cispo, dapo = summary["cells"]["K4/cispo"], summary["cells"]["K4/dapo"]
    assert cispo["seeds"] == 2 and cispo["reached"] == 2
    assert cispo["final_accuracy"][0] == pytest.approx(0.55)
    assert cispo["final_accuracy"][1] == pytest.approx(0.0707107, abs=1e-6)  # stdev of 0.6, 0.5
    assert cispo["steps_to_target"] == (7.5, pytest.approx(3.5355339, abs=1e-6))
    assert cispo["seconds_to_target"][0] == 15.0
    assert dapo["reached"] == 1 and dapo["steps_to_target"] == (15.0, 0.0)
    assert cispo["steps_ratio_vs_dapo"] == 0.5 and dapo["steps_ratio_vs_dapo"] == 1.0
    assert cispo["clip_frac"] == pytest.approx(0.2) and cispo["samples"] == 192
    assert "K4/grpo" not in summary["cells"]  # a failed run is kept in the JSON, not averaged
    # (0.4 + 0.5 + 0.6) / 3 and (0.3 + 0.45 + 0.5) / 3: every evaluation after step 0
    assert cispo["mean_accuracy"][0] == pytest.approx((0.5 + 1.25 / 3) / 2)
    assert dapo["seconds_to_target"][0] == 30.0
    row = "| 4 | cispo | 0.0001 | 2 | 0.550 ± 0.071 | 0.458 ± 0.059 | 2/2 | 7.5 ± 3.5 |"
    assert row in bench.table(summary, {"description": "x"})
    by_lr = bench.summarise(runs, target=0.4, by_lr=True)["cells"]
    assert set(by_lr) == {"K4/cispo/lr0.0001", "K4/dapo/lr0.0001"}
    assert by_lr["K4/cispo/lr0.0001"]["steps_ratio_vs_dapo"] == 0.5


def test_plan_interleaves_seeds_then_k_then_algorithm():
    args = bench.parse_args(["--ks", "1,4", "--seeds", "2", "--lr", "cispo=1e-4,grpo=2e-5,dapo=3e-5"])
    order = bench.plan(args)
    assert len(order) == 12
    assert order[:4] == [
        ("cispo", 1, 0, 1e-4),
        ("grpo", 1, 0, 2e-5),
        ("dapo", 1, 0, 3e-5),
        ("cispo", 4, 0, 1e-4),
    ]
    assert order[6] == ("cispo", 1, 1, 1e-4)
    sweep = bench.plan(bench.parse_args(["--sweep", "--sweep-lrs", "1e-5,1e-4"]))
    assert sweep == [(a, 4, 0, lr) for lr in (1e-5, 1e-4) for a in bench.ALGORITHMS]
    assert bench.plan(bench.parse_args(["--quick"]))[0][1] == 4
    with pytest.raises(SystemExit, match="unknown"):
        bench.plan(bench.parse_args(["--algorithms", "ppo"]))


def test_the_committed_result_is_complete():
    """The full matrix as committed: every algorithm at K = 1, 4, 16, three seeds each, every run with its
    held-out curve and diagnostics, and a summary cell for each (K, algorithm)."""
    result = json.loads((REPO / "benchmarks" / "results" / "algorithms.json").read_text())
    assert result["schema"] == bench.SCHEMA_VERSION
    assert set(result["algorithms"]) == set(bench.ALGORITHMS) and result["ks"] == [1, 4, 16]
    runs = result["runs"]
    for algo in bench.ALGORITHMS:
        for k in (1, 4, 16):
            cell = [r for r in runs if r["algorithm"] == algo and r["K"] == k and "error" not in r]
            assert len({r["seed"] for r in cell}) >= 3, (algo, k)
            assert result["summary"]["cells"][f"K{k}/{algo}"]["seeds"] >= 3
            for run in cell:
                assert len(run["eval"]["accuracy"]) == len(run["eval"]["step"]) >= 2
                assert run["eval"]["step"][-1] == result["steps"] == run["steps"][-1]
                assert set(bench.STEP_KEYS) <= set(run["series"])
                assert {f"loss/{k}" for k in bench.LOSS_KEYS} <= set(run["series"])
