"""benchmarks/algorithms.py: the curves it reads from metrics.jsonl, by hand (its statistics and plans:
test_algorithms_stats.py); and the committed result, so that a later change cannot silently drop the
benchmark (its schema and seed counts are checked, not its values)."""

import json
from pathlib import Path

import pytest

from benchmarks import algorithms as bench
from benchmarks import algorithms_stats as stats

REPO = Path(__file__).resolve().parents[2]


def _metrics(tmp_path: Path, accs: dict[int, float], algo: str = "cispo") -> Path:
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/ran": 1, "warmstart/accuracy": 0.2}]
    for step in range(1, 5):
        row = {"step": step, "reward/mean": 0.1 * step, "time/step_s": 2.0, "entropy": 1.0,
               f"{algo}/clip_frac": 0.25 * step, f"{algo}/is_weight_mean": 1.0,
               "ratio/abs_log_last": float("nan") if step == 2 else step / 8}  # fmt: skip
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
    assert got["series"]["ratio/abs_log_last"] == [0.125, None, 0.375, 0.5]  # NaN (nothing trained) as null
    assert set(bench.DIAG_KEYS) | {"entropy", "actor/grad_norm"} <= set(got["series"])


def test_curves_refuse_a_run_without_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "eval/accuracy": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no training steps"):
        bench.curves(path, "cispo")


def test_the_committed_result_is_complete():
    """The first study as committed (algorithms.json, schema 1), read through load_result as phase
    `legacy`: every algorithm at K = 1, 4, 16, three seeds each, every run with its held-out curve and
    diagnostics, and a summary cell for each (K, algorithm)."""
    raw = json.loads((REPO / "benchmarks" / "results" / "algorithms.json").read_text())
    assert raw["schema"] == 1 and set(raw["algorithms"]) == set(bench.ALGORITHMS) and raw["ks"] == [1, 4, 16]
    result = bench.load_result(REPO / "benchmarks" / "results" / "algorithms.json", "scratchpad")
    assert result["schema"] == bench.SCHEMA_VERSION and result["migrated_from_schema"] == 1
    runs = result["runs"]
    assert {r["phase"] for r in runs} == {"legacy"}
    assert {r["algorithm"]: r["interval"] for r in runs} == {
        "cispo": [0.0, 5.0], "dapo": [0.8, 1.28], "grpo": [0.8, 1.2]}  # fmt: skip
    assert len({r["key"] for r in runs}) == len(runs)
    for algo in bench.ALGORITHMS:
        for k in (1, 4, 16):
            cell = [r for r in runs if r["algorithm"] == algo and r["K"] == k and "error" not in r]
            assert len({r["seed"] for r in cell}) >= 3, (algo, k)
            assert raw["summary"]["cells"][f"K{k}/{algo}"]["seeds"] >= 3
            for run in cell:
                assert len(run["eval"]["accuracy"]) == len(run["eval"]["step"]) >= 2
                assert run["eval"]["step"][-1] == raw["steps"] == run["steps"][-1]
                assert set(bench.STEP_KEYS) <= set(run["series"])
                assert {f"loss/{k}" for k in bench.LOSS_KEYS} <= set(run["series"])


def test_runs_in_flight_at_once_are_all_recorded(tmp_path, monkeypatch):
    """--jobs 2: every planned run lands in the JSON once, each marked with how many ran beside it, and
    --resume then finds nothing left to do. train() is replaced by one that returns a finished curve."""
    done: list[str] = []

    def fake_train(spec, args):
        done.append(spec.key)
        run_dir = tmp_path / bench.run_dir_name(spec.key)
        run_dir.mkdir()
        curve = bench.curves(_metrics(run_dir, {2: 0.4, 4: 0.6}), spec.algorithm)
        return {**spec.record(), "interval": None, "process_wall_s": 1.0, "cli_overrides": [], **curve}

    monkeypatch.setattr(bench, "train", fake_train)
    out = ["--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--runs", str(tmp_path)]
    common = ["--task", "scratchpad", "--phase", "tune", "--algorithms", "grpo", "--ks", "4", *out]
    bench.main([*common, "--jobs", "2"])
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert len(done) == 4 and sorted(r["key"] for r in runs) == sorted(done)  # lr 3e-5, 1e-4 x eps 0.1, 0.2
    assert {r["concurrent_runs"] for r in runs} == {2}
    bench.main([*common, "--resume"])
    assert len(done) == 4


@pytest.mark.parametrize(("task", "steps"), [("scratchpad", 60), ("long", 40)])
def test_the_committed_study_is_complete(task, steps):
    """benchmarks/results/algorithms_<task>.json: the whole tuning grid on the tuning seed, and every
    reported cell (each K x each algorithm) on the 5 report seeds with the values chosen there; the
    chosen values were picked on the tuning seed only (recomputed here from the runs)."""
    path = REPO / "benchmarks" / "results" / f"algorithms_{task}.json"
    result = json.loads(path.read_text())
    runs = [r for r in result["runs"] if "error" not in r]
    assert not [r["key"] for r in result["runs"] if "error" in r]
    tune = {r["key"] for r in runs if r["phase"] == "tune"}
    assert tune == {spec.key for spec in stats.tune_plan(task, bench.ALGORITHMS)}
    choices = stats.choose(runs, result["target"])
    assert {name: (c["lr"], c["loss_kwargs"]) for name, c in choices.items()} == {
        name: (c["lr"], c["loss_kwargs"]) for name, c in result["choices"].items()
    }
    for algo in bench.ALGORITHMS:
        for k in bench.TASKS[task]["report_ks"]:
            cell = [r for r in runs if r["phase"] == "report" and r["algorithm"] == algo and r["K"] == k]
            assert sorted(r["seed"] for r in cell) == list(stats.REPORT_SEEDS), (algo, k)
            chosen = choices[f"K{k}/{algo}"]
            assert all(r["lr"] == chosen["lr"] and r["loss_kwargs"] == chosen["loss_kwargs"] for r in cell)
            assert all(r["eval"]["step"][-1] == r["steps"][-1] == steps for r in cell)
            assert result["summary"]["cells"][f"report/K{k}/{algo}"]["seeds"] == 5
