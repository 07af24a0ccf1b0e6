"""benchmarks/long_context.py at a tiny T (256) with SP 1 and SP 2, through its own entry point (spawned
gloo processes, as the full benchmark), so that a change to sequence_parallel.py cannot silently break
it. Times and memory are not checked (only that they were measured); the SP 2 ranks' losses must sum to
the SP 1 loss and the all-reduced gradient norms must agree: the benchmark measures the same update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "long_context.py"


@pytest.mark.timeout(300)
def test_sp1_and_sp2_run_one_update_at_tiny_t(tmp_path):
    out = tmp_path / "long_context.json"
    command = [
        sys.executable, str(SCRIPT), "--tokens", "256", "--sp", "1,2", "--hidden", "128",
        "--layers", "2", "--kv-heads", "2", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["sp"]: r for r in result["rows"]}
    assert set(rows) == {1, 2} and all(r["tokens"] == 256 for r in rows.values())
    assert len(rows[2]["ranks"]) == 2
    for row in rows.values():
        assert row["seconds"] > 0 and row["held_mb"] > 0 and row["peak_mb"] >= row["held_mb"]
    assert rows[2]["loss"] == pytest.approx(rows[1]["loss"], abs=1e-5)
    assert rows[2]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-4)
    assert "| 256 | 2 |" in out.with_suffix(".md").read_text()
