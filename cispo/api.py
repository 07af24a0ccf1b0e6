"""The Python API: the runs `cispo-train` and `cispo-eval` make, from a script or a notebook.

    import cispo

    result = cispo.train(["experiment.total_steps=20"], run_dir="runs/mine")  # Hydra overrides
    result = cispo.train({"algorithm": "grpo", "experiment.total_steps": 20})  # or a mapping of them
    scores = cispo.evaluate("runs/mine")  # the run's trained policy, runs/mine/hf

Configs compose from the same YAML files as the command line, so `cispo.train()` is exactly
`cispo-train` (one source of defaults); `cispo.compose(overrides)` returns that TrainConfig to inspect or
edit before `cispo.train(config)`. Both return what the CLI writes to `<run dir>/result.json` (strict JSON:
a number not measured is None).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cispo.core.config import TrainConfig
from cispo.core.launch import add_launch_dir

Overrides = Sequence[str] | Mapping[str, Any] | None

__all__ = ["compose", "evaluate", "strict_result", "train", "write_result"]


class ImportedByChildProcess(RuntimeError):
    """cispo.train / cispo.evaluate called while a multiprocessing child re-imports the user's script."""


def _override_list(overrides: Overrides) -> list[str]:
    """Hydra override strings from a list of them or a mapping {dotted key or group: value}."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise TypeError(
            f"overrides: a list of 'key=value' strings or a mapping, got the string {overrides!r}"
        )
    if isinstance(overrides, Mapping):
        return [f"{key}={_override_value(value)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def compose(overrides: Overrides = None) -> TrainConfig:
    """The validated TrainConfig that `cispo-train <overrides>` runs (the same YAML, schema and checks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cispo.core.config import register_configs
    from cispo.driver.cli import CONFIG_DIR, to_train_config

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()  # a previous compose in this process
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="cispo"):
        cfg = hydra_compose(config_name="config", overrides=_override_list(overrides))
    return to_train_config(cfg)


def _split_run_dir(overrides: list[str]) -> tuple[list[str], str | None]:
    """(the config overrides, the last `hydra.run.dir=` value if any): the one Hydra setting taken."""
    rest = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if any(o.startswith("hydra.") for o in rest):
        raise ValueError(f"config error: only hydra.run.dir is taken from the API's overrides, not {rest}")
    return rest, given[-1] if given else None


def _default_run_dir(cfg: TrainConfig) -> Path:
    """The CLI's default, `runs/<experiment.name>/<time>` (configs/config.yaml's hydra.run.dir)."""
    return Path("runs") / cfg.experiment.name / time.strftime("%Y-%m-%d_%H-%M-%S")


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """multiprocessing's spawn and forkserver children (the reward workers) import the main script again,
    as `__mp_main__`, to find what it defines: a script that calls cispo.train() without an
    `if __name__ == "__main__":` guard would train again in each of them. They do that only when the main
    module names a file or module (`__file__`, `__spec__`), so those are hidden while the run starts its
    processes (rewards never come from __main__: workers load them by name or path) and restored after."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        if "__spec__" in saved:
            main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _check_not_in_child() -> None:
    """Still, a child that re-imports the script (a pool the user started before) must not train: say
    what to do instead of recursing or crashing later with an unrelated error."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "__mp_main__":
            raise ImportedByChildProcess(
                f"cispo.train/cispo.evaluate was called while a worker process re-imported "
                f"{frame.f_globals.get('__file__', 'your script')}: put the call under "
                '`if __name__ == "__main__":` (worker processes import the main script)'
            )
        frame = frame.f_back


def _prepare(config: TrainConfig | Overrides, run_dir: str | Path | None) -> tuple[TrainConfig, Path]:
    _check_not_in_child()
    # Plugins named as modules next to where the script runs import without PYTHONPATH, in every process
    # the run starts (learner ranks, Ray workers), as with the CLI; the directory goes last on the path and
    # our package names stay pinned to our packages (a user's rewards.py there is not taken for ours).
    add_launch_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if isinstance(config, TrainConfig):
        from omegaconf import OmegaConf

        from cispo.driver.cli import to_train_config

        cfg = to_train_config(OmegaConf.structured(config))  # the same checks as a composed config
        given = None
    else:
        overrides, given = _split_run_dir(_override_list(config))
        cfg = compose(overrides)
    chosen = run_dir if run_dir is not None else given
    return cfg, Path(chosen) if chosen is not None else _default_run_dir(cfg)


def _run(cfg: TrainConfig, directory: Path) -> dict[str, Any]:
    from cispo.driver.loop import train as run

    directory.mkdir(parents=True, exist_ok=True)
    with _main_not_reimported():
        result = run(cfg, directory)
    return write_result(directory, result)


def train(config: TrainConfig | Overrides = None, *, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Trains as `cispo-train` does and returns its result (also written to `<run dir>/result.json`).

    config: Hydra overrides (["algorithm=grpo", "experiment.total_steps=20"] or a mapping of them; None
    for the defaults), or a TrainConfig from `cispo.compose`. run_dir: default as the CLI's,
    `runs/<experiment.name>/<time>` (a `hydra.run.dir=` override works too); an existing run directory
    resumes from its latest checkpoint unless `resume=never`."""
    return _run(*_prepare(config, run_dir))


def evaluate(
    model: str | Path | None = None,
    overrides: Overrides = None,
    *,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Held-out evaluation as `cispo-eval` does: `model` is a Hugging Face directory or a run directory
    (its `hf/`), default model.name of the config; overrides as for `train` (`eval.sets`: which sets).
    Returns {"final_eval_accuracy", "samples", "eval/<set>/<metric>" of each set}; the generations land in
    `<run_dir>/eval_samples.jsonl`."""
    extra = _override_list(overrides) + ["experiment.eval_only=true"]
    if model is not None:
        extra.append(f"model.name={Path(model).resolve() if Path(model).exists() else model}")
    return _run(*_prepare(extra, run_dir))


def strict_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result as strict JSON values: a float that is NaN or infinite (nothing measured) becomes None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}


def write_result(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """`<run dir>/result.json`, strict JSON (no NaN, which JSON does not have); returns what it wrote."""
    strict = strict_result(result)
    (run_dir / "result.json").write_text(json.dumps(strict, indent=2, allow_nan=False))
    return strict
