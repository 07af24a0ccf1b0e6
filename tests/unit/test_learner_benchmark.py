"""benchmarks/learner_throughput.py runs every case for one rollout batch, through its own entry point (a
subprocess per case, as the full benchmark does), so a change to a learner cannot silently break it again
(its DeepSpeed cases once crashed on a removed attribute and the README kept figures from before). Values
are not checked, only that each case ran, timed its batch and measured its memory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "learner_throughput.py"
CASES = ("torch", "deepspeed-zero2", "deepspeed-zero3", "trl")
# CI installs '.[dev]', not '.[bench]': TRL is the baseline, not a dependency of the learners.
TRL_MISSING = importlib.util.find_spec("trl") is None


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES)
def test_every_case_runs_one_batch(case, tmp_path):
    if case == "trl" and TRL_MISSING:
        pytest.skip("TRL is not installed (pip install -e '.[bench]'); the baseline case cannot run")
    out = tmp_path / "learner_throughput.json"
    # A small batch (2 prompts x 4 generations x 8 tokens) on the benchmark's model; K = 2 so that the
    # minibatch split and the K-step call are exercised; 1 thread per rank process.
    command = [
        sys.executable, str(SCRIPT), "--cases", case, "--ks", "2", "--rounds", "1", "--batches", "1",
        "--warmup", "0", "--prompts", "2", "--generations", "4", "--completion", "8", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))}  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=850, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["case"] == case and run["k"] == 2 and len(run["batch_seconds"]) == 1
    assert run["seconds"] > 0 and run["tokens_per_batch"] == 2 * 4 * 8
    processes = 2 if case.startswith("deepspeed") else 1
    assert run["processes"] == processes
    assert run["peak_mb"] > 0  # for DeepSpeed, read from /proc of each rank actor's pid
    assert out.with_suffix(".md").read_text().count(f"| {case} | 2 |") == 1
