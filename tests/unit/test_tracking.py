"""Where a run's words and numbers go: cli.log and plain progress lines off a terminal, W&B settings from
the standard WANDB_* variables and the logging config."""

from pathlib import Path

import pytest

from cispo.core.config import LoggingConfig
from cispo.driver import tracking
from cispo.driver.tracking import Tracker, resolve_wandb_mode


@pytest.mark.parametrize(
    ("requested", "env", "expected"),
    [
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_DISABLED": "true"}, "disabled"),
        ("offline", {"WANDB_MODE": "online"}, "offline"),  # an explicit logging.wandb wins
        ("auto", {}, "offline"),  # no API key here
    ],
)
def test_wandb_mode_honours_the_environment(monkeypatch, requested, env, expected):
    for key in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking.Path, "home", lambda: Path("/nonexistent"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_wandb_mode(requested) == expected


def test_wandb_init_takes_project_entity_dir_from_env_and_group_tags_name_from_config(monkeypatch, tmp_path):
    import wandb

    seen = {}

    class FakeRun:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or FakeRun())
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    cfg = LoggingConfig(wandb="offline", group="sweep-1", tags=["cispo", "k4"], progress=False)
    Tracker(cfg, tmp_path / "run", "addition", {}, total_steps=2).close()
    assert seen["project"] == "from-env" and seen["entity"] == "team"
    assert seen["dir"] == str(tmp_path / "wandb-dir")
    assert seen["group"] == "sweep-1" and seen["tags"] == ["cispo", "k4"]
    assert seen["name"] == "addition-run" and seen["mode"] == "offline"
    cfg = LoggingConfig(wandb="offline", project="mine", run_name="named", progress=False)
    Tracker(cfg, tmp_path / "run2", "addition", {}, total_steps=2).close()
    assert seen["project"] == "mine" and seen["name"] == "named"


def test_plain_progress_lines_every_log_every_steps_to_stdout_and_cli_log(tmp_path, capsys):
    cfg = LoggingConfig(wandb="disabled", log_every=2, progress=True)  # no terminal here: no bar
    tracker = Tracker(cfg, tmp_path, "addition", {}, total_steps=4)
    tracker.print("warm start: loaded from cache")
    for step in range(1, 5):
        tracker.log(step, {"reward/mean": step / 10, "eval/accuracy": 0.5, "time/step_s": 0.25})
    tracker.close()
    out = capsys.readouterr().out
    assert "step 2: reward 0.200  eval 0.500" in out and "step 4: reward 0.400" in out
    assert "step 1:" not in out and "step 3:" not in out
    log = (tmp_path / "cli.log").read_text()
    assert "warm start: loaded from cache" in log and "step 4: reward 0.400" in log
    assert not (tmp_path / "wandb").exists()
