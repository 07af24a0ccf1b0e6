"""The Python API: cispo.compose gives what cispo-train composes (one source of defaults: the YAML), and
cispo.train / cispo.evaluate run from a plain script, with no `__main__` guard, and return their results."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import cispo
from cispo.core.config import TrainConfig
from cispo.driver.cli import to_train_config

ROOT = Path(__file__).resolve().parents[2]


def cli_composition(*overrides: str) -> TrainConfig:
    """What `cispo-train --cfg job <overrides>` prints, as the validated TrainConfig."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "cispo.driver.cli", "--cfg", "job", *overrides]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=True)
    return to_train_config(OmegaConf.merge(OmegaConf.structured(TrainConfig), yaml.safe_load(out.stdout)))


@pytest.mark.parametrize("overrides", [[], ["algorithm=grpo", "experiment.total_steps=7"]])
def test_compose_is_the_cli_composition(overrides):
    assert cispo.compose(overrides) == cli_composition(*overrides)


def test_a_mapping_of_overrides_and_bad_keys():
    composed = cispo.compose({"algorithm": "dapo", "experiment.total_steps": 7, "logging.plot": False})
    assert composed == cispo.compose(["algorithm=dapo", "experiment.total_steps=7", "logging.plot=false"])
    assert composed.algorithm.loss == "dapo" and composed.experiment.total_steps == 7
    with pytest.raises(ValueError, match="did you mean experiment.total_steps"):
        cispo.compose(["+experiment.totl_steps=5"])


def test_result_json_is_strict_json(tmp_path: Path):
    """A value not measured (NaN: a run without evaluations) is null; JSON has no NaN."""
    from cispo.api import write_result

    written = write_result(tmp_path, {"final_eval_accuracy": float("nan"), "steps": 3.0, "x": float("inf")})
    assert written == {"final_eval_accuracy": None, "steps": 3.0, "x": None}
    text = (tmp_path / "result.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == written


SCRIPT = """
import json, sys
import cispo

# No `if __name__ == "__main__":` guard: the reward worker processes must not run this again.
print("SCRIPT RAN", flush=True)
result = cispo.train({overrides!r}, run_dir=sys.argv[1])
scores = cispo.evaluate(sys.argv[1], {eval_overrides!r}, run_dir=sys.argv[1] + "-eval")
print("RESULT " + json.dumps({{"train": result, "eval": scores}}), flush=True)
"""


@pytest.mark.slow
def test_train_and_evaluate_from_a_script_without_a_main_guard(tmp_path: Path):
    quiet = {"logging.wandb": "disabled", "logging.plot": False, "logging.progress": False}
    quiet["model.warmstart.enabled"] = False  # what is tested is the API, not the policy's accuracy
    eval_overrides = {**quiet, "data.num_eval": 16, "rollout.backend": "local"}
    # A wall-clock limit far below one step: the run stops after step 1, and still ends with a checkpoint.
    overrides = {**eval_overrides, "experiment.total_steps": 50, "experiment.max_time_s": 0.001}
    script = tmp_path / "train_it.py"
    script.write_text(textwrap.dedent(SCRIPT.format(overrides=overrides, eval_overrides=eval_overrides)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("SCRIPT RAN") == 1, done.stdout[-3000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert results["train"]["steps"] == 1.0
    assert results["train"] == json.loads((run / "result.json").read_text())
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]
    assert json.loads((run / "hf" / "cispo_export.json").read_text())["step"] == 1
    assert results["eval"]["samples"] == 16.0
    assert 0.0 <= results["eval"]["final_eval_accuracy"] <= 1.0
    assert "stopping at step 1: experiment.max_time_s reached" in (run / "cli.log").read_text()
