"""algorithm.overlong_buffer with the `overlong` reward plugin is refused: length would be penalised twice."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from cispo.core.config import register_configs
from cispo.driver.cli import CONFIG_DIR, to_train_config
from cispo.driver.validate import check_plugins

register_configs()


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=list(overrides)))


def _add_overlong_plugin(cfg) -> None:
    spec = type(cfg.reward.rewards[0])
    cfg.reward.rewards.append(spec(name="overlong", weight=1.0, kwargs={"max_len": 16, "cache_len": 4}))


def test_dapo_shaping_with_the_overlong_plugin_is_an_error_naming_both():
    cfg = _cfg("algorithm=dapo")
    check_plugins(cfg)  # the preset alone is fine
    _add_overlong_plugin(cfg)
    with pytest.raises(ValueError, match=r"reward.rewards\[1\].*overlong_buffer"):
        check_plugins(cfg)


def test_the_plugin_alone_is_fine():
    cfg = _cfg("algorithm=cispo")
    _add_overlong_plugin(cfg)
    check_plugins(cfg)
