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

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cispo.core.config import TrainConfig, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")  # package data: a link to <repo>/configs


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
    try:
        train_cfg = to_train_config(cfg)
    except (ValueError, TypeError) as err:
        # Config errors name the key; a traceback would only bury that.
        print(f"cispo-train: {err}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cispo.driver.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = train(train_cfg, run_dir)
    except ValueError as err:
        if not str(err).startswith("config error"):
            raise
        print(f"cispo-train: {err}", file=sys.stderr)  # found while loading data or models: still one line
        sys.exit(2)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main() -> None:
    # Plugins named as modules next to where the run is launched (`reward.rewards=[{name:
    # myrewards:score}]`) import without PYTHONPATH; the learner ranks and Ray workers get the same path.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH", "")) if p)
    register_configs()
    _hydra_main()


def eval_main() -> None:
    """`cispo-eval model.name=<path> ...`: held-out evaluation of a model, no training."""
    sys.argv.append("experiment.eval_only=true")
    main()


if __name__ == "__main__":
    main()
