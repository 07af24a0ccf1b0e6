"""A `kill -9` of the driver (its pid alone, not its process group) leaves nothing it started running: the
Ray head, its agents (ray::DashboardAgent, ray::RuntimeEnvAgent, re-parented to init when the head dies),
the rollout worker actors and the reward worker processes all go (cispo.driver.reaper)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cispo.driver.reaper import _processes, descendants, ray_temp_dir

pytestmark = pytest.mark.slow


def command(run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={run_dir}", "rollout.backend=ray",
        "experiment.total_steps=100000", "experiment.eval_every=0", "experiment.checkpoint_every=0",
        "model.warmstart.enabled=false", "data.prompts_per_step=4", "algorithm.max_zero_variance_steps=0",
        "reward.isolation=process", "logging.wandb=disabled", "logging.plot=false", "logging.progress=false",
    ]  # fmt: skip


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return max((json.loads(line)["step"] for line in lines), default=0)


def name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def still_running(started: dict[int, int]) -> dict[int, str]:
    """The processes of `started` (pid -> start time) that still run as themselves (not zombies)."""
    table = _processes()
    alive = {}
    for pid, start in started.items():
        if pid in table and table[pid][1] == start:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                alive[pid] = name(pid)
    return alive


def test_kill_9_of_the_driver_leaves_no_process_it_started(tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command(run_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while last_step(run_dir) < 1:  # a trained step: Ray, its workers and the reward processes are up
            assert proc.poll() is None, f"the run ended early ({proc.returncode}): {run_dir}/cli.log"
            assert time.monotonic() < deadline, "the run did not reach its first step"
            time.sleep(0.2)
        table = _processes()
        below = descendants({proc.pid}, table)
        started = {pid: table[pid][1] for pid in below if "cispo.driver.reaper" not in name(pid)}
        names = " | ".join(name(pid) for pid in started)
        assert "ray::RolloutWorker" in names and "raylet" in names, names  # what there is to clean up
        assert any("ray::DashboardAgent" in name(pid) or "dashboard" in name(pid) for pid in started), names

        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its process group is left as it was
        proc.wait()
        # The reaper acts within a second (0.2 s measured). Without it Ray's agents outlive the driver by
        # ~60 s (until their own raylet check gives up) and would fail this; 30 s is far from both.
        deadline = time.monotonic() + 30
        while still_running(started):
            assert time.monotonic() < deadline, f"left running: {still_running(started)}"
            time.sleep(0.2)
        marker = ray_temp_dir(proc.pid) + "/"
        named = [pid for pid in _processes() if marker.encode() in name(pid).encode()]
        assert named == [], [name(pid) for pid in named]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
