"""A run the Ray cluster cannot hold stops at start-up, naming the shortfall, instead of waiting.

Two real 1-CPU Ray nodes on this machine; `cispo-train learner=deepspeed` with 2 learner ranks and a rollout
worker reserves 3 CPUs. Before the check, both ranks were placed and the driver then waited
rollout.worker_start_timeout_s (1800 s) for a CPU for the worker, without a word. The subprocess timeout
below is only a hang guard.
"""

import os
import subprocess
import sys

import pytest

from tests.integration.ray_cluster import ENV, start_two_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_two_nodes(tmp_path_factory.mktemp("ray_logs"), cpus_per_node=1)
    yield running
    running.stop()


@pytest.mark.timeout(900)
def test_too_few_cpus_stops_the_run_naming_them(cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, **ENV, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "cispo.driver.cli",
        f"hydra.run.dir={run_dir}",
        "learner=deepspeed",
        "learner.num_ranks=2",
        "rollout.num_workers=1",
        f"cluster.ray_address={cluster.address}",
        "cluster.num_nodes=2",
        "model.warmstart.enabled=false",
        "experiment.total_steps=1",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0, out.stdout[-2000:]
    expected = (
        "the run reserves 3 CPUs (learner 2 x 1, rollout 1 x 1) "
        f"but the Ray cluster at {cluster.address} has 2 CPUs"
    )
    assert expected in out.stderr, out.stderr[-3000:]
    assert not (run_dir / "placement.json").exists()  # stopped before anything was placed
