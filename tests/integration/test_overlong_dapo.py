"""algorithm=dapo through the CLI logs its overlong shaping: one step of a tiny run (in-process engine,
rewards in the driver, no warm start) whose random policy runs most responses to the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_algorithms import run_cli


@pytest.mark.timeout(300)
def test_dapo_step_logs_the_overlong_shaping(tmp_path: Path):
    rows = run_cli(
        tmp_path,
        "algorithm=dapo",
        "algorithm.group_size=4",
        "experiment.total_steps=1",
        "experiment.eval_every=0",
        "experiment.checkpoint_every=0",
        "data.prompts_per_step=2",
        "rollout.backend=local",
        "rollout.max_new_tokens=6",
        "reward.isolation=thread",
        "model.warmstart.enabled=false",
        timeout=300,
    )
    (step,) = [r for r in rows if r.get("step") == 1 and "reward/mean" in r]
    assert step["rollout/budget"] == 6.0
    # Every response cut off at the budget has the full penalty; reward/mean stays the task reward.
    assert step["reward/overlong_frac"] >= step["rollout/finish_length"] > 0
    assert -1.0 <= step["reward/overlong_penalty_mean"] < 0
    shaped = step["reward/mean"] + step["reward/overlong_penalty_mean"]
    assert step["reward/shaped_mean"] == pytest.approx(shaped)
