"""The README's plugin example is a real file: it passes the reward contract, loads by module name from the
working directory (no PYTHONPATH) and by file path, and a run scores with it, with the README's own command
(issue #22: exact_match keeps its defaults in a list, metric keys use short names, and a user's rewards.py
or rollout.py next to the launch does not break the run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cispo.core.launch import LAUNCH_DIR_ENV
from rewards import RewardInput, get_reward

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "myrewards.py"
README_REWARDS = "reward.rewards=[{name: exact_match}, {name: myrewards:digit_credit, weight: 0.5}]"


def test_the_readme_command_is_the_one_tested() -> None:
    assert f"cispo-train '{README_REWARDS}'" in (ROOT / "README.md").read_text()
    assert f"cispo-train '{README_REWARDS}'" in EXAMPLE.read_text()


def test_the_readme_reward_list_scores_a_right_answer_in_full(tmp_path: Path, monkeypatch) -> None:
    """Replacing the group's list used to drop exact_match's `extract: none`: every answer scored 0."""
    from cispo.driver.build import build_scorers
    from cispo.driver.plan import compose_config

    shutil.copy(EXAMPLE, tmp_path / "myrewards.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the registry appends the launch directory
    cfg = compose_config([README_REWARDS])
    with build_scorers(cfg)[0] as scorer:
        right, near = scorer.score([RewardInput("12+34=", "46", "46"), RewardInput("12+34=", "47", "46")])
        metrics = scorer.metrics()
    assert (right.score, near.score) == (1.5, 0.25)  # exact_match 1 + 0.5 * digits, 0 + 0.5 * 1/2
    assert metrics["reward/exact_match/mean"] == 0.5 and metrics["reward/digit_credit/mean"] == 0.75


def test_example_scores_by_file_path():
    reward = get_reward(f"{EXAMPLE}:digit_credit")
    assert reward(RewardInput("12+34=", "46", "46")).score == 1.0
    assert reward(RewardInput("12+34=", "47", "46")).score == 0.5
    assert reward(RewardInput("12+34=", "", "46")).reason == "empty answer"
    strict = get_reward(f"{EXAMPLE}:digit_credit", min_length=3)
    assert strict(RewardInput("12+34=", "46", "46")).score == 0.0


def _cispo_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    # The console script, not `python -m`, which would put the working directory on sys.path by itself.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", LAUNCH_DIR_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        str(Path(sys.executable).parent / "cispo-train"), f"hydra.run.dir={cwd / 'run'}", *overrides,
        "experiment.total_steps=1", "experiment.eval_every=0", "model.warmstart.enabled=false",
        "logging.wandb=disabled", "logging.plot=false", "data.prompts_per_step=4",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _user_files(where: Path) -> None:
    """The example plugin, and files named like our packages (the default run uses Ray rollout workers,
    whose sys.path starts with the launch directory)."""
    shutil.copy(EXAMPLE, where / "myrewards.py")
    for name in ("rewards.py", "rollout.py"):
        (where / name).write_text("def fn(sample):\n    return 1.0\n")


def test_a_plugin_named_like_our_package_is_refused_with_the_path_to_use(tmp_path: Path) -> None:
    _user_files(tmp_path)
    out = _cispo_train(tmp_path, "reward.rewards=[{name: rewards:fn}]")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "reward.rewards[0]" in out.stderr and "name yours by path: './rewards.py:fn'" in out.stderr


@pytest.mark.slow
def test_a_run_finds_the_plugin_next_to_where_it_is_launched(tmp_path: Path):
    _user_files(tmp_path)
    out = _cispo_train(tmp_path, README_REWARDS)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["step"] == 1 and "reward/mean" in r)
    assert "reward/digit_credit/mean" in step and "reward/exact_match/mean" in step
    assert step["reward/errors"] == 0.0 and step["reward/timeouts"] == 0.0


def test_a_configured_range_reaches_the_scorer_and_a_bad_one_is_a_config_error(tmp_path: Path) -> None:
    from cispo.driver.build import build_scorers
    from cispo.driver.plan import compose_config

    (tmp_path / "penalty.py").write_text("def minus_half(sample):\n    return -0.5\n")
    entry = f"{{name: {tmp_path / 'penalty.py'}:minus_half, low: -1, high: 0}}"
    cfg = compose_config([f"reward.rewards=[{entry}]"])
    assert (cfg.reward.rewards[0].low, cfg.reward.rewards[0].high) == (-1.0, 0.0)
    with build_scorers(cfg)[0] as scorer:
        assert scorer.score([RewardInput("q", "a", "b")])[0].score == -0.5
        assert scorer.metrics()["reward/minus_half/mean"] == -0.5
    bad = f"{{name: {tmp_path / 'penalty.py'}:minus_half, low: 1, high: 0}}"
    with pytest.raises(
        ValueError, match=r"reward\.rewards\[0\].*score range \[1.0, 0.0\] needs finite low < high"
    ):
        compose_config([f"reward.rewards=[{bad}]"])
