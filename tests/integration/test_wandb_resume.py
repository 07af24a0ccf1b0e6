"""kill -9 a real run after W&B wrote steps past its checkpoint to disk, resume=auto, and read the offline
W&B runs back: each run's steps increase, one row per step, and no row is lost: the interrupted run keeps
its rows after the checkpoint, the resumed segment (`<id>-r<checkpoint>`, same group) logs the rest."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cispo.driver.checkpoint import checkpoint_step, complete_checkpoints
from tests.wandb_records import offline_runs, read_run

STEPS, CHECKPOINT_EVERY = 12, 4


def command(run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={run_dir}", "learner=torch",
        f"experiment.total_steps={STEPS}", f"experiment.checkpoint_every={CHECKPOINT_EVERY}",
        "experiment.eval_every=4", "data.prompts_per_step=8", "data.num_eval=16",
        "logging.wandb=offline", "logging.plot=false", "logging.progress=false",
    ]  # fmt: skip


def recorded_steps(run_dir: Path) -> list[int]:
    files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    return read_run(files[0]).steps if files else []


@pytest.mark.slow
def test_kill_9_and_resume_keeps_one_row_per_step_in_monotonic_wandb_runs(tmp_path: Path):
    run_dir = tmp_path / "run"
    # W&B writes its .wandb file every second (cispo's default; W&B's own is 15 s): here every 50 ms, so
    # the rows past the checkpoint are on disk well before the next checkpoint, two steps later.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.05"}  # fmt: skip
    proc = subprocess.Popen(
        command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group (W&B's service has its own and exits by itself)
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while max(recorded_steps(run_dir), default=-1) <= CHECKPOINT_EVERY:  # rows past the checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = checkpoint_step(complete_checkpoints(run_dir)[-1])
    resumed = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in (run_dir / "cli.log").read_text()

    killed, again = offline_runs(run_dir / "wandb", finished=False)
    base = (run_dir / ".wandb_id").read_text().strip()
    assert killed.run_id == base and again.run_id == f"{base}-r{checkpoint}"
    assert again.group == killed.group
    assert again.config["cispo_resume"] == {"from_run": base, "from_step": checkpoint}
    for run in (killed, again):
        assert run.steps == sorted(set(run.steps)), run.steps  # increasing: one row per step
    assert killed.steps[-1] > checkpoint  # its rows after the checkpoint are kept, not lost
    assert again.steps == list(range(checkpoint + 1, STEPS + 1))
    assert [s for s in killed.steps if s <= checkpoint] + again.steps == list(range(STEPS + 1))
    assert again.summary["eval/final_accuracy"] == again.rows[-1]["eval/accuracy"]
    assert again.rows[0]["train/step"] == checkpoint + 1 and again.rows[0]["progress/samples_seen"] > 0
