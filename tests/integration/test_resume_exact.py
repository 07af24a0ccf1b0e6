"""kill -9 mid-run, resume=auto, and the run is the uninterrupted one: every logged value of every step equal
(time measurements aside), no step logged twice, every prompt of the data stream trained on exactly once.
With the torch learner and rollouts streamed two steps ahead (algorithm.max_staleness=2: groups are in
flight when the driver dies), and with the DeepSpeed learner in the synchronous loop.

What makes it exact: sampling seeds derived from (experiment seed, step, round, group) rather than a
stream that lives in the workers; each step's policy version fixed by the schedule; the minibatch RNG,
data cursor, the steps drawn ahead (scored), curriculum and global RNGs checkpointed; metrics.jsonl and
batches.jsonl cut back to the checkpoint's step on resume.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS, CHECKPOINT_EVERY, KILL_AFTER = 8, 3, 5


def command(run_dir: Path, learner: str, staleness: int) -> list[str]:
    return [
        sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={run_dir}", f"learner={learner}",
        f"algorithm.max_staleness={staleness}",
        f"experiment.total_steps={STEPS}", f"experiment.checkpoint_every={CHECKPOINT_EVERY}",
        "experiment.eval_every=4", "data.prompts_per_step=8", "data.num_eval=16",
        "logging.wandb=disabled", "logging.plot=false", "logging.progress=false",
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] == 0:
            continue  # construction facts: warm-start and start-up seconds
        # time/, throughput/ and system/ (memory) measure the machine, not what the run computed.
        out.append({k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "system/"))})
    return out


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def trained_groups(run_dir: Path) -> list[list[int]]:
    """Per step, the data-stream indices of the prompt groups it trained on (batches.jsonl)."""
    lines = (run_dir / "batches.jsonl").read_text().splitlines()
    return [json.loads(line)["groups"] for line in lines]


def kill_after(run_dir: Path, steps: int, cmd: list[str]) -> None:
    """Starts `cmd` and kill -9s it, Ray and learner ranks included, once `steps` steps are logged."""
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes Ray and the learner ranks too
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while last_step(run_dir) < steps:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("learner", "staleness"), [("torch", 2), ("deepspeed", 0)])
def test_kill_9_and_resume_equals_the_uninterrupted_run(tmp_path: Path, learner: str, staleness: int):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted run goes alongside the killed and resumed ones: they share nothing (run dirs, Ray
    # instances, ports), and much of a run's start-up waits on processes starting rather than on a CPU.
    with (tmp_path / "whole.log").open("w") as log:
        done = subprocess.Popen(
            command(whole, learner, staleness), env=env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            kill_after(killed, KILL_AFTER, command(killed, learner, staleness))
            assert last_step(killed) < STEPS
            again = command(killed, learner, staleness)
            resumed = subprocess.run(again, env=env(), capture_output=True, text=True, timeout=1200)
            assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
            assert done.wait(timeout=1200) == 0, (tmp_path / "whole.log").read_text()[-4000:]
        finally:
            if done.poll() is None:
                os.killpg(done.pid, signal.SIGKILL)
                done.wait()
    assert "resumed from" in (killed / "cli.log").read_text()
    expected, got = rows(whole), rows(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]  # none lost, none twice
    trained = [r for r in expected if r.get("cispo/loss") is not None]
    assert trained, "no update happened: nothing was compared"
    for want, have in zip(expected, got):
        assert have == want, f"step {want['step']} differs"
    # Every prompt exactly once: the groups trained on, step by step, are the uninterrupted run's, and
    # none twice (the groups in flight at the kill were neither lost nor trained on twice).
    groups = trained_groups(killed)
    assert groups == trained_groups(whole) and len(groups) == STEPS
    flat = [g for step in groups for g in step]
    assert sorted(flat) == list(range(STEPS * 8))
