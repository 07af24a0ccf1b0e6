"""Two evaluation sets through a real run and `cispo-eval`: a greedy held-out set and a set of other data
(three-digit sums) sampled 4 times at a temperature. Both are logged as eval/<set>/<metric> in every
evaluation row, the first set's accuracy is still eval/accuracy, every generation lands in
eval_samples.jsonl under its set, result.json holds each set's numbers, and `cispo-eval` on the run's
policy gives the held-out set the same greedy answers as the trainer's final evaluation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.test_export_eval import cli

SETS = (
    "eval.sets=[{name: held_out}, {name: three, data: {generator_kwargs: {digits: 3}}, num: 6, samples: 4, "
    "temperature: 0.7, metrics: [pass@k, mean@k, pass@2]}]"
)
COMMON = [
    SETS,
    "data.num_eval=8",
    "logging.table_samples=64",
    "logging.wandb=disabled",
    "logging.progress=false",
    "logging.plot=false",
    "rollout.backend=local",
]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_sets_in_a_run_and_in_cispo_eval(tmp_path: Path):
    run = tmp_path / "run"
    cli(
        "cispo.driver.cli",
        f"hydra.run.dir={run}",
        *COMMON,
        "model.warmstart.enabled=false",
        "experiment.total_steps=2",
        "experiment.eval_every=1",
        "data.prompts_per_step=4",
        "algorithm.group_size=2",
    )
    evals = [r for r in jsonl(run / "metrics.jsonl") if r.get("eval/ran") and "eval/three/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for row in evals:
        assert row["eval/held_out/accuracy"] == row["eval/accuracy"]
        assert row["eval/reward/samples"] == 8  # the first set's counters keep their keys
        assert row["eval/three/reward/samples"] == 6 * 4
        assert 0 <= row["eval/three/mean@4"] <= row["eval/three/pass@2"] <= row["eval/three/pass@4"] <= 1
        assert row["eval/three/accuracy"] == pytest.approx(row["eval/three/mean@4"])  # 4 samples each
    samples = jsonl(run / "eval_samples.jsonl")
    assert Counter((r["step"], r["set"]) for r in samples) == {
        (s, name): n for s in (0, 1, 2) for name, n in (("held_out", 8), ("three", 24))
    }
    three = [r for r in samples if r["set"] == "three" and r["step"] == 2]
    assert all(len(r["prompt"].split("+")[0]) == 3 for r in three)
    assert list(Counter(r["prompt"] for r in three).values()) == [4] * 6
    result = json.loads((run / "result.json").read_text())
    assert result["eval/held_out/accuracy"] == result["final_eval_accuracy"]
    keys = {"eval/three/accuracy", "eval/three/pass@4", "eval/three/mean@4", "eval/three/pass@2"}
    assert keys <= set(result)

    evaluated = tmp_path / "eval"
    cli(
        "cispo.driver.cli",
        f"model.name={run}",
        f"hydra.run.dir={evaluated}",
        *COMMON,
        "experiment.eval_only=true",
    )
    result = json.loads((evaluated / "result.json").read_text())
    assert result["eval/held_out/accuracy"] == result["final_eval_accuracy"] and result["samples"] == 8
    assert keys <= set(result)
    trained = {r["prompt"]: r["completion"] for r in samples if r["step"] == 2 and r["set"] == "held_out"}
    rows = jsonl(evaluated / "eval_samples.jsonl")
    again = {r["prompt"]: r["completion"] for r in rows if r["set"] == "held_out"}
    assert again == trained
