"""Every shipped algorithm and every shipped preset that fits this machine runs real steps through the CLI.

`--cfg job` alone once hid a crash at the first GRPO update (CISPO's loss kwargs merged into GRPO's), so
each algorithm here trains: the warm-started tiny policy gets mixed rewards, groups have signal, and the
loss under the algorithm's own name must be logged. The 512-GPU preset cannot run here; it composes and
passes the start-up checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_config import composed, to_train_config

QUIET = ["logging.wandb=disabled", "logging.plot=false", "logging.progress=false"]


def run_cli(run_dir: Path, *overrides: str, timeout: int = 900) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={run_dir}", *QUIET, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["cispo", "grpo", "dapo"])
def test_every_algorithm_trains_two_steps(tmp_path: Path, algorithm: str):
    rows = run_cli(
        tmp_path,
        f"algorithm={algorithm}",
        "experiment.total_steps=2",
        "experiment.eval_every=0",
        "experiment.checkpoint_every=0",
        "data.prompts_per_step=8",
        # The warm start is cached by data.num_eval among others: 16, the suite's other warm-started runs'
        # value, so a fresh clone trains one warm start for all of them instead of one more here.
        "data.num_eval=16",
        # What differs between algorithms is the learner's loss; rollouts in the driver's process spare
        # each run a Ray start (Ray rollout workers: test_train_e2e, test_resume_exact).
        "rollout.backend=local",
    )
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    trained = [r for r in steps if r.get(f"{algorithm}/loss") is not None]
    assert trained, f"no {algorithm} update in 2 steps: {steps}"
    assert all(r["actor/grad_norm"] > 0 for r in trained)
    assert trained[-1]["policy/version"] >= 1
    if algorithm != "cispo":
        assert not any(key.startswith("cispo/") for r in rows for key in r)


@pytest.mark.slow
def test_smollm2_preset_runs_two_steps(tmp_path: Path):
    rows = run_cli(
        tmp_path,
        "experiment=smollm2_gsm",
        "experiment.total_steps=2",
        "experiment.eval_every=0",
        "experiment.checkpoint_every=0",
        "data.prompts_per_step=1",
        "algorithm.group_size=2",
        "rollout.max_new_tokens=16",
    )
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/samples_generated"] == 2 for r in steps)


def test_the_512_gpu_preset_composes_and_passes_start_up_checks():
    cfg = to_train_config(composed("experiment=minimax_m1_512gpu"))
    assert cfg.learner.backend == "deepspeed" and cfg.rollout.engine == "vllm"
