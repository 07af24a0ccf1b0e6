"""The dress rehearsal of the MiniMax-M1 preset: 3 steps of `experiment=minimax_m1_rehearsal` on a real
2-node Ray cluster on this machine, from a random checkpoint written in the published remote-code layout,
through the real preset's code paths: the checkpoint converted on load, 2 DeepSpeed ZeRO-3 ranks building
inside zero.Init and loading their shards, Adam states on the CPU, gradient checkpointing, the staged
curriculum at its first budget (160 tokens), repetition stop, routing replay, the weight channel from
learner rank 0 to the engine (the driver refuses weight tensors), placement.json.

Heavy: run under `flock /tmp/cispo-heavy.lock`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cispo.models.random_checkpoint import write_random_checkpoint
from tests.integration.ray_cluster import ENV, start_two_nodes

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # 2 CPUs a node: 2 learner ranks + 1 rollout worker cannot share one node, so both are used.
    running = start_two_nodes(tmp_path_factory.mktemp("ray_logs"), cpus_per_node=2)
    yield running
    running.stop()


@pytest.mark.timeout(900)
def test_three_rehearsal_steps_through_the_real_presets_code_paths(cluster, tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / "minimax_m1_tiny")
    assert json.loads((checkpoint / "config.json").read_text())["rotary_dim"] == 8  # of head_dim 16
    run_dir, cache = tmp_path / "run", tmp_path / "cispo_cache"
    env = {**os.environ, **ENV, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "CISPO_CACHE": str(cache)}
    env["CISPO_DRIVER_REFUSES_WEIGHTS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))
    cmd = [sys.executable, "-m", "cispo.driver.cli", "experiment=minimax_m1_rehearsal",
           f"model.name={checkpoint}", f"cluster.ray_address={cluster.address}", f"hydra.run.dir={run_dir}",
           "logging.wandb=disabled", "logging.progress=false"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env=env)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-5000:]

    # converted once from the remote-code layout, into the run's cache
    assert [p.name.split("-")[0] for p in (cache / "models").iterdir()] == ["native"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == STEPS
    assert all(isinstance(r["cispo/loss"], float) and math.isfinite(r["cispo/loss"]) for r in steps), steps
    # Every update applied: a step DeepSpeed skips for a non-finite gradient norm still logs a finite loss.
    assert all(r["actor/skipped_frac"] == 0.0 for r in steps), steps
    placement = json.loads((run_dir / "placement.json").read_text())["processes"]
    nodes = {p["node_ip"] for p in placement}
    assert nodes == set(cluster.node_ips) and sum(p["role"] == "learner" for p in placement) == 2
    assert all(f"placement: learner {r} on " in printed for r in (0, 1))
    assert (run_dir / "hf" / "config.json").is_file()  # written by learner rank 0, not the driver
