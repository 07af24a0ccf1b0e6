"""The README's plugin example is a real file: it passes the reward contract, loads by module name from the
working directory (no PYTHONPATH) and by file path, and a run scores with it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import RewardInput, get_reward

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "myrewards.py"


def test_example_scores_by_file_path():
    reward = get_reward(f"{EXAMPLE}:digit_credit")
    assert reward(RewardInput("12+34=", "46", "46")).score == 1.0
    assert reward(RewardInput("12+34=", "47", "46")).score == 0.5
    assert reward(RewardInput("12+34=", "", "46")).reason == "empty answer"
    strict = get_reward(f"{EXAMPLE}:digit_credit", min_length=3)
    assert strict(RewardInput("12+34=", "46", "46")).score == 0.0


@pytest.mark.slow
def test_a_run_finds_the_plugin_next_to_where_it_is_launched(tmp_path: Path):
    # The console script, not `python -m`, which would put the working directory on sys.path by itself.
    shutil.copy(EXAMPLE, tmp_path / "myrewards.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    rewards = "reward.rewards=[{name: exact_match, weight: 1.0}, {name: myrewards:digit_credit, weight: 0.5}]"
    cmd = [
        str(Path(sys.executable).parent / "cispo-train"), f"hydra.run.dir={tmp_path / 'run'}", rewards,
        "experiment.total_steps=1", "experiment.eval_every=0", "model.warmstart.enabled=false",
        "logging.wandb=disabled", "logging.plot=false", "data.prompts_per_step=4",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["step"] == 1 and "reward/mean" in r)
    assert "reward/myrewards:digit_credit/mean" in step and step["reward/errors"] == 0.0
