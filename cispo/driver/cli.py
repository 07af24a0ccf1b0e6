"""`cispo-train`: the Hydra entry point.

cispo-train                                  # the embedded default (tiny MiniMax, addition, CISPO)
cispo-train algorithm=grpo experiment.total_steps=100
cispo-train experiment=smollm2_gsm           # a preset that overrides several groups
cispo-train hydra.run.dir=runs/mine resume=auto
cispo-train --cfg job                        # print the composed config and exit
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cispo.core.config import TrainConfig, register_configs
from cispo.core.launch import add_launch_dir

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")  # package data: a link to <repo>/configs
CONFIG_ERROR = 2  # the exit code of every config error, Hydra's and ours
# Whether Hydra handed over a composed config (an exit before that was a config error), and the reaper.
_STATE: dict[str, Any] = {"composed": False, "reaper": None}


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed DictConfig as validated dataclasses: no key outside the schema (even one added with
    `+`), every __post_init__ value check, then every name a registry resolves. All of it runs before a
    model is built or a warm start begins."""
    from cispo.driver.validate import absolute_plugin_paths, check_keys, check_plugins

    check_keys(cfg)
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    absolute_plugin_paths(train_cfg)
    check_plugins(train_cfg)
    return train_cfg


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _STATE["composed"] = True
    try:
        train_cfg = to_train_config(cfg)
    except (ValueError, TypeError) as err:
        # Config errors name the key; a traceback would only bury that.
        print(f"cispo-train: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cispo.api import write_result
    from cispo.driver.loop import train
    from cispo.driver.reaper import start_reaper
    from cispo.driver.update import RunStopped

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _STATE["reaper"] = start_reaper()  # a kill -9 of this process leaves nothing it started running
    try:
        result = train(train_cfg, run_dir)
    except ValueError as err:
        if not str(err).startswith("config error"):
            raise
        print(f"cispo-train: {err}", file=sys.stderr)  # found while loading data or models: still one line
        sys.exit(CONFIG_ERROR)
    except RunStopped as err:  # the run stopped itself, saying why (non-finite updates, no reward signal)
        print(f"cispo-train: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(write_result(run_dir, result), indent=2))  # strict JSON: NaN (not measured) is null


def main() -> None:
    # Plugins named as modules next to where the run is launched (`reward.rewards=[{name:
    # myrewards:score}]`) import without PYTHONPATH, in every process of the run; the directory goes last
    # on the path, so a user's rewards.py there never replaces our `rewards` package (cispo.core.launch).
    add_launch_dir()
    register_configs()
    try:
        _hydra_main()
    except SystemExit as done:
        # Hydra reports its own config errors (an unknown key or group, a wrong type, a bad override) and
        # exits 1 before the config reaches us; every config error exits CONFIG_ERROR, as ours do.
        if done.code == 1 and not _STATE["composed"]:
            sys.exit(CONFIG_ERROR)
        raise


def eval_main() -> None:
    """`cispo-eval model.name=<path> ...`: held-out evaluation of a model, no training."""
    sys.argv.append("experiment.eval_only=true")
    main()


if __name__ == "__main__":
    main()
