"""Config composition and validation: what a user typing overrides sees."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from cispo.core.config import TrainConfig, register_configs
from cispo.driver.cli import CONFIG_DIR, to_train_config

register_configs()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_composes_to_typed_dataclasses():
    cfg = to_train_config(composed())
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "tiny_minimax" and cfg.algorithm.loss == "cispo"
    assert cfg.algorithm.loss_kwargs == {"eps_low": 1.0, "eps_high": 4.0, "token_mask": False}
    assert tuple(cfg.learner.betas) == (0.9, 0.95) and cfg.learner.adam_eps == 1e-15


@pytest.mark.parametrize(
    "group",
    [
        "algorithm=grpo",
        "algorithm=dapo",
        "learner=deepspeed",
        "rollout=vllm",
        "curriculum=staged_80k",
        "data=reasoning_gym",
        "reward=math",
        "experiment=smollm2_gsm",
        "experiment=minimax_m1_512gpu",
    ],
)
def test_every_shipped_option_composes_and_validates(group):
    to_train_config(composed(group))


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException, match="model.bogus") as err:
        composed("model.bogus=1")
    assert isinstance(err.value.__cause__, (ConfigKeyError, ConfigAttributeError))


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="rollout.num_workers=many") as err:
        composed("rollout.num_workers=many")
    assert isinstance(err.value.__cause__, ValidationError)
    assert "full_key: rollout.num_workers" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.temperature=0", "rollout.temperature"),
        ("algorithm.loss=ppo", r"unknown policy loss 'ppo'; registered: cispo, dapo, grpo"),
        ("algorithm.group_size=1", "algorithm.group_size"),
        ("data.source=csv", "data.source"),
        ("logging.wandb=sometimes", "logging.wandb"),
        ("curriculum.enabled=true", "^$|never"),  # the shipped stages are valid: no error
    ],
)
def test_bad_values_fail_with_the_key(override, message):
    if message == "^$|never":
        to_train_config(composed(override))
        return
    with pytest.raises(ValueError, match=message):
        to_train_config(composed(override))


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path):
    cmd = [sys.executable, "-m", "cispo.driver.cli", "algorithm.updates_per_batch=0"]
    cmd.append(f"hydra.run.dir={tmp_path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "config error at algorithm.updates_per_batch" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_prints_the_composed_job_config():
    out = subprocess.run(
        [sys.executable, "-m", "cispo.driver.cli", "--cfg", "job", "algorithm=grpo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "loss: grpo" in out.stdout


def test_weight_group_ranks_leave_room_for_tensor_parallel_engines():
    """Sender 0; an engine of TP 8 takes ranks 1-8, the next starts at 9 (its processes add their TP rank)."""
    from cispo.core.weight_channel import group_ranks

    assert group_ranks([1, 1]) == ([1, 2], 3)
    assert group_ranks([8, 8, 8]) == ([1, 9, 17], 25)
    assert group_ranks([2, 1, 4]) == ([1, 3, 4], 8)
