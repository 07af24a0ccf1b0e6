"""Start-up checks that run before any model is built or any warm start begins.

Three kinds, all raising ValueError("config error at <key>: ...") so the CLI can print one line:
- check_keys: every key of the composed config exists in the schema. Hydra's struct mode already rejects
  `key=value` for unknown keys, but `+key=value` and `++key=value` add keys on purpose, so a typo such as
  `+experiment.totl_steps=5` would otherwise be dropped silently and the run would do 500 steps.
- check_plugins: names only a registry can resolve (loss, advantage, learner backend, engine, rewards),
  the kwargs each is given against its signature, and backend-specific settings (a learner class may
  define `check_config(LearnerConfig)`, as the DeepSpeed learner does for zero_stage).
- check_placement (run last by check_plugins): on a GPU cluster the explicit GPU split agrees with the
  groups that use it (learner ranks, rollout workers x GPUs, the engine's tensor-parallel size).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cispo.algo.advantages import get_advantage
from cispo.algo.losses import get_policy_loss
from cispo.core.config import TrainConfig
from cispo.core.registry import is_file_path
from cispo.learner import learner_backend
from rewards.registry import load_reward
from rollout.engine import ENGINES

# Arguments the learner derives itself (token weights from algorithm.normalizer and the batch's groups);
# through loss_kwargs they would be silently overridden, so they are refused there.
LOSS_RESERVED = ("token_weights", "normalizer", "group_ids")


def _fail(key: str, message: str) -> ValueError:
    return ValueError(f"config error at {key}: {message}")


def check_keys(node: Mapping[str, Any], schema: type = TrainConfig, path: str = "") -> None:
    """Rejects keys the schema does not declare, naming the full key and the closest declared one."""
    hints = typing.get_type_hints(schema)
    declared = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        full = f"{path}{key}"
        if key not in declared:
            close = difflib.get_close_matches(str(key), declared, n=1)
            where = path or "the top level"
            hint = f"; did you mean {path}{close[0]}?" if close else f"; {where} has {declared}"
            raise _fail(full, f"unknown key{hint}")
        kind, value = hints[key], node[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            check_keys(value, kind, f"{full}.")
        elif typing.get_origin(kind) is list and isinstance(value, typing.Sequence):
            (item,) = typing.get_args(kind) or (None,)
            if dataclasses.is_dataclass(item):
                for index, element in enumerate(value):
                    if isinstance(element, Mapping):
                        check_keys(element, item, f"{full}[{index}].")


def check_kwargs(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], key: str, skip: int, reserved: tuple[str, ...] = ()
) -> None:
    """`kwargs` must be keyword parameters of `fn` past its first `skip` positional ones."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [
        p.name
        for p in params[skip:]
        if p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in reserved
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        name = getattr(fn, "__qualname__", repr(fn))
        raise _fail(key, f"{name} takes no argument {unknown}; it accepts {accepted}")


def check_clip_bounds(kwargs: Mapping[str, Any], key: str) -> None:
    """Clip offsets keep their meaning: the lower bound 1 - eps_low stays in [0, 1], offsets are >= 0."""
    if "eps_low" in kwargs and not 0.0 <= float(kwargs["eps_low"]) <= 1.0:
        raise _fail(f"{key}.eps_low", f"must be in [0, 1] (lower bound 1 - eps_low), got {kwargs['eps_low']}")
    for name in ("eps_high", "eps"):
        if name in kwargs and float(kwargs[name]) < 0:
            raise _fail(f"{key}.{name}", f"must be >= 0 (an offset from 1), got {kwargs[name]}")


def absolute_plugin_paths(cfg: TrainConfig) -> None:
    """`file.py:attr` names made absolute in place, so Ray workers and learner ranks, whose working
    directories differ from the driver's, load the same file."""

    def fix(name: str) -> str:
        if not is_file_path(name):
            return name
        file, _, attr = name.partition(":")
        return f"{Path(file).expanduser().resolve()}:{attr}"

    cfg.algorithm.loss, cfg.algorithm.advantage = fix(cfg.algorithm.loss), fix(cfg.algorithm.advantage)
    cfg.learner.backend, cfg.rollout.engine = fix(cfg.learner.backend), fix(cfg.rollout.engine)
    for item in cfg.reward.rewards:
        item.name = fix(item.name)


# Keys that only one kind of backend reads, by (section, kind): set with another kind they would be
# ignored silently (learner.zero_stage=3 with the torch learner), so they are refused naming the key.
# Learner kinds: "ranked" (a learner on Ray ranks: DeepSpeed) or "in-process"; rollout kinds: rollout.backend.
BACKEND_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("learner", "ranked"): ("zero_stage", "offload_optimizer", "num_ranks", "zero_init"),
    ("rollout", "ray"): (
        "num_workers",
        "num_cpus_per_worker",
        "num_gpus_per_worker",
        "worker_timeout_s",
        "worker_timeout_factor",
        "worker_timeout_min_s",
        "worker_start_timeout_s",
        "max_restarts",
        "restart_window_s",
    ),
}


def _backend_kinds(cfg: TrainConfig) -> dict[str, tuple[str, str]]:
    """Each section's backend kind, and how the user chose it (for messages)."""
    ranked = learner_backend(cfg.learner.backend).ray_ranks
    return {
        "learner": ("ranked" if ranked else "in-process", f"learner.backend={cfg.learner.backend!r}"),
        "rollout": (cfg.rollout.backend, f"rollout.backend={cfg.rollout.backend!r}"),
    }


def check_backend_keys(cfg: TrainConfig) -> None:
    """A key another backend reads, set away from its default, is refused naming the key and the backend."""
    kinds = _backend_kinds(cfg)
    for (section, kind), keys in BACKEND_KEYS.items():
        chosen, how = kinds[section]
        if chosen == kind:
            continue
        node = getattr(cfg, section)
        defaults = {f.name: f.default for f in dataclasses.fields(node)}
        for key in keys:
            if getattr(node, key) != defaults[key]:
                raise _fail(
                    f"{section}.{key}",
                    f"only a {kind} {section} backend reads it, and {how} would ignore it "
                    f"(set to {getattr(node, key)!r}); drop it or choose a {kind} backend",
                )


def check_plugins(cfg: TrainConfig) -> None:
    algo = cfg.algorithm
    loss = _resolve("algorithm.loss", get_policy_loss, algo.loss)
    taken = sorted(set(algo.loss_kwargs) & set(LOSS_RESERVED))
    if taken:
        raise _fail(f"algorithm.loss_kwargs.{taken[0]}", "set by the learner (choose algorithm.normalizer)")
    check_kwargs(loss, algo.loss_kwargs, "algorithm.loss_kwargs", skip=4, reserved=LOSS_RESERVED)
    check_clip_bounds(algo.loss_kwargs, "algorithm.loss_kwargs")
    for index, stage in enumerate(cfg.curriculum.stages if cfg.curriculum.enabled else []):
        key = f"curriculum.stages[{index}].loss_kwargs"
        check_kwargs(loss, {**algo.loss_kwargs, **stage.loss_kwargs}, key, skip=4, reserved=LOSS_RESERVED)
        check_clip_bounds(stage.loss_kwargs, key)
    advantage = _resolve("algorithm.advantage", get_advantage, algo.advantage)
    check_kwargs(advantage, algo.advantage_kwargs, "algorithm.advantage_kwargs", skip=2)
    learner = _resolve("learner.backend", learner_backend, cfg.learner.backend)
    if hasattr(learner, "check_config"):
        try:
            learner.check_config(cfg.learner)
        except ValueError as err:
            raise _fail("learner", str(err)) from None
    _resolve("rollout.engine", ENGINES.get, cfg.rollout.engine)
    check_backend_keys(cfg)
    for index, item in enumerate(cfg.reward.rewards):
        try:
            load_reward(item.name, dict(item.kwargs), low=item.low, high=item.high)
        except (ValueError, TypeError) as err:
            raise _fail(f"reward.rewards[{index}]", str(err)) from None
        if algo.overlong_buffer > 0 and item.name in OVERLONG_REWARDS:
            # The same curve twice: once from the reward plugin (fixed window), once from the shaping.
            raise _fail(
                f"reward.rewards[{index}]",
                "the overlong reward and algorithm.overlong_buffer > 0 would penalise length twice; keep one",
            )
    check_placement(cfg)


OVERLONG_REWARDS = ("overlong", "rewards.length:overlong_reward")


def check_placement(cfg: TrainConfig) -> None:
    """Cross-group GPU accounting when cluster.gpus_per_node > 0: cluster.learner_gpus is learner.num_ranks
    (DeepSpeed: one GPU per rank), cluster.rollout_gpus is rollout.num_workers x num_gpus_per_worker, and a
    vLLM tensor-parallel size given in the engine kwargs spans exactly the GPUs of its worker."""
    cluster, rollout, learner = cfg.cluster, cfg.rollout, cfg.learner
    ranked = learner_backend(learner.backend).ray_ranks  # resolved by check_plugins
    if cluster.weight_sync == "broadcast" and not (ranked and rollout.backend == "ray"):
        raise _fail(
            "cluster.weight_sync",
            "broadcast sends weights from learner rank 0 to Ray rollout workers: it needs a learner on Ray "
            f"ranks (learner=deepspeed) and rollout.backend=ray; got learner.backend={learner.backend!r}, "
            f"rollout.backend={rollout.backend!r} (auto picks the right path)",
        )
    if cluster.gpus_per_node <= 0:
        return
    if learner.backend == "deepspeed" and cluster.learner_gpus != learner.num_ranks:
        raise _fail(
            "cluster.learner_gpus",
            f"{cluster.learner_gpus} GPUs but learner.num_ranks = {learner.num_ranks} "
            "(one GPU per DeepSpeed rank)",
        )
    wanted = rollout.num_workers * rollout.num_gpus_per_worker
    if not math.isclose(cluster.rollout_gpus, wanted):
        raise _fail(
            "cluster.rollout_gpus",
            f"{cluster.rollout_gpus} GPUs but rollout.num_workers x rollout.num_gpus_per_worker = "
            f"{rollout.num_workers} x {rollout.num_gpus_per_worker:g} = {wanted:g}",
        )
    tp = dict(getattr(rollout, "engine_kwargs", None) or {}).get("tensor_parallel_size")
    if (
        rollout.engine == "vllm"
        and tp is not None
        and not math.isclose(float(tp), rollout.num_gpus_per_worker)
    ):
        raise _fail(
            "rollout.engine_kwargs.tensor_parallel_size",
            f"{tp} but each rollout worker reserves rollout.num_gpus_per_worker = "
            f"{rollout.num_gpus_per_worker:g} GPUs; vLLM's tensor parallelism must span exactly those",
        )


def _resolve(key: str, lookup: Callable[[str], Any], name: str) -> Any:
    try:
        return lookup(name)
    except (ValueError, TypeError) as err:
        raise _fail(key, str(err)) from None
