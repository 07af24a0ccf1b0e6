"""Trained models come out in Hugging Face format and evaluate without training.

Train 2 steps -> <run dir>/hf -> `cispo-eval model.name=<run dir>/hf` in a fresh process gives the same
greedy answers as the trainer's final evaluation; `cispo-export` rebuilds the same weights from the
checkpoint; a resume leaves policy_init/ untouched.
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


@pytest.mark.slow
def test_train_export_load_and_eval_round_trip(tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    steps = ["experiment.total_steps=2", "experiment.eval_every=2", "experiment.checkpoint_every=2"]
    cli("cispo.driver.cli", f"hydra.run.dir={run}", *QUIET, *EVAL, *steps)
    trained = final_eval(run)
    assert len(trained) == 16

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    learner = torch.load(run / "checkpoints" / "step_0000002" / "learner.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, learner[name], rtol=0, atol=0, msg=name)

    evaluated = tmp_path / "eval"
    cli(
        "cispo.driver.cli",
        "experiment.eval_only=true",
        f"model.name={run / 'hf'}",
        f"hydra.run.dir={evaluated}",
        *QUIET,
        *EVAL,
    )
    assert final_eval(evaluated) == trained
    rows = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and "reward/mean" not in rows[0]

    exported = tmp_path / "exported"
    cli("cispo.driver.export", str(run), "--out", str(exported))
    assert (
        load_file(exported / "model.safetensors").keys() == load_file(run / "hf" / "model.safetensors").keys()
    )
    assert digest(exported / "model.safetensors") == digest(run / "hf" / "model.safetensors")

    init = digest(run / "policy_init" / "model.safetensors")
    cli(
        "cispo.driver.cli",
        f"hydra.run.dir={run}",
        *QUIET,
        *EVAL,
        "experiment.total_steps=3",
        "experiment.eval_every=0",
    )
    assert digest(run / "policy_init" / "model.safetensors") == init
