"""Trained models come out in Hugging Face format and evaluate without training.

Train 2 steps (shorter than checkpoint_every: the run still ends with a complete checkpoint) -> <run dir>/hf
-> `cispo-eval model.name=<run dir>` in a fresh process gives the same greedy answers as the trainer's
final evaluation; `cispo-export` says which step it exports and rebuilds the same weights from the
checkpoint; a resume leaves policy_init/ untouched; a resume from an earlier checkpoint discards the later
branch and hf/ follows it; result.json is strict JSON.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

QUIET = ["logging.wandb=disabled", "logging.plot=false", "logging.progress=false"]
EVAL = ["data.num_eval=16", "logging.table_samples=16", "rollout.backend=local"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def final_eval(run_dir: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    return {r["prompt"]: r["completion"] for r in rows if r["step"] == last}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_train_export_load_and_eval_round_trip(tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cli(
        "cispo.driver.cli",
        f"hydra.run.dir={run}",
        *QUIET,
        *EVAL,
        "experiment.total_steps=2",
        "experiment.eval_every=2",
    )
    trained = final_eval(run)
    assert len(trained) == 16
    # checkpoint_every is 100: the only checkpoint is the final one, and hf/ says it holds that step.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert json.loads((run / "hf" / "cispo_export.json").read_text())["step"] == 2
    assert strict_json(run / "result.json")["steps"] == 2

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    learner = load_file(run / "checkpoints" / "step_0000002" / "model.safetensors")
    state = model.state_dict()
    assert learner.keys() <= state.keys()
    for name, value in learner.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)

    evaluated = tmp_path / "eval"
    # The run directory, not <run dir>/hf: cispo-eval finds the trained policy itself.
    cli(
        "cispo.driver.cli",
        "experiment.eval_only=true",
        f"model.name={run}",
        f"hydra.run.dir={evaluated}",
        *QUIET,
        *EVAL,
    )
    assert final_eval(evaluated) == trained
    rows = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and "reward/mean" not in rows[0]
    assert strict_json(evaluated / "result.json")["samples"] == 16

    exported = tmp_path / "exported"
    said = cli("cispo.driver.export", str(run), "--out", str(exported)).stdout
    assert "step 2" in said
    assert (
        load_file(exported / "model.safetensors").keys() == load_file(run / "hf" / "model.safetensors").keys()
    )
    assert digest(exported / "model.safetensors") == digest(run / "hf" / "model.safetensors")
    assert "step 2" in cli("cispo.driver.export", str(run)).stdout  # hf/ holds step 2 already: same step

    init = digest(run / "policy_init" / "model.safetensors")
    more = ["experiment.total_steps=3", "experiment.eval_every=0"]
    cli("cispo.driver.cli", f"hydra.run.dir={run}", *QUIET, *EVAL, *more)
    assert digest(run / "policy_init" / "model.safetensors") == init
    assert json.loads((run / "hf" / "cispo_export.json").read_text())["step"] == 3
    assert strict_json(run / "result.json")["steps"] == 3
    at_three = digest(run / "hf" / "model.safetensors")

    # Going back to step 2 is explicit: the step-3 branch and its hf/ are moved aside, with a message.
    back = [f"resume={run / 'checkpoints' / 'step_0000002'}", "experiment.total_steps=2"]
    cli("cispo.driver.cli", f"hydra.run.dir={run}", *QUIET, *EVAL, *back)
    assert "discarding the later branch: moved step_0000003, hf" in (run / "cli.log").read_text()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert digest(run / "hf" / "model.safetensors") == digest(exported / "model.safetensors") != at_three
