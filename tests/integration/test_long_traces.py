"""Traces of real length on this machine: `experiment=long_traces_cpu` runs 5 CISPO steps whose every
response is 4,096 tokens, through the DeepSpeed learner with sequence parallelism 2 on 2 ranks and
packing of the hybrid model (lightning state restarted at each packed sequence). Slow, but CI runs it.

Heavy: run under `flock /tmp/cispo-heavy.lock`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.integration.test_train_e2e import records, run_cli

pytestmark = pytest.mark.slow
BUDGET = 4096


@pytest.mark.timeout(1500)
def test_five_cispo_steps_on_4096_token_traces_with_sequence_parallelism_and_packing(tmp_path: Path):
    run_dir = tmp_path / "run"
    out = run_cli(run_dir, "experiment=long_traces_cpu", timeout=1400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    rows = [r for r in records(run_dir) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        # every response ran to the budget (1 prompt x 4 samples x 4,096 new tokens a step)
        assert row["response_length/mean"] == BUDGET and row["response_length/max"] == BUDGET, row
        assert row["rollout/new_tokens"] == 1 * 4 * BUDGET, row
        assert math.isfinite(row["cispo/loss"]) and row["actor/grad_norm"] > 0, row
        assert row["actor/skipped_frac"] == 0.0, row
        # The sharded, packed learner scores the 4K traces as the engine sampled them (same weights at the
        # first update): a wrong boundary, shift or exchange would show as O(1) differences.
        assert row["train_infer/logprob_max_abs_diff"] < 1e-4, row
