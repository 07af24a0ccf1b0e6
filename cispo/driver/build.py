"""Construction, and nothing else: every stage of a run built from the config.

This (with the CLI) is where the driver reaches into the other packages: cispo.driver <- rollout, rewards.
Nothing here trains or evaluates; the warm start is its own stage (cispo/driver/warmstart.py), run by
the loop between building the policy and building the stages that use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cispo.algo.advantages import AdvantageFn, get_advantage
from cispo.core.config import TrainConfig
from cispo.core.launch import RAY_SETUP_HOOK
from cispo.core.placement import PlacementEntry
from cispo.driver.checkpoint import checkpoint_step
from cispo.driver.cluster import check_cluster, local_cpu_demand
from cispo.driver.curriculum import LengthCurriculum
from cispo.driver.data import PromptStream, check_prompt_lengths, eval_groups, load_split
from cispo.driver.export import INIT_DIR
from cispo.driver.policy import (
    TINY_MINIMAX_DEFAULTS,
    build_policy,
    count_parameters,
    link_pretrained,
    load_policy,
    load_tokenizer,
    smollm2_dir,
)
from cispo.driver.reaper import ray_temp_dir
from cispo.driver.rollout_stage import RolloutStage
from cispo.driver.tracking import Tracker
from cispo.learner import Learner, build_learner, learner_backend
from cispo.models.loading import engine_dir
from rewards.scorer import RewardScorer, RewardSpec, Scorer
from rollout.manager import LocalRolloutManager, RolloutManager
from rollout.tasks import RolloutBackend
from rollout.weight_sync import BroadcastWeightSync


@dataclass
class Stages:
    """What the loop drives. Each stage owns its state; the loop owns only the step counter."""

    rollout: RolloutStage
    learner: Learner
    tracker: Tracker
    curriculum: LengthCurriculum
    advantage_fn: AdvantageFn

    def close(self) -> None:
        self.tracker.close()
        self.rollout.close()
        self.learner.close()


def build_tracker(cfg: TrainConfig, run_dir: Path, resume_from: Path | None) -> Tracker:
    return Tracker(
        cfg.logging,
        run_dir,
        cfg.experiment.name,
        dataclasses.asdict(cfg),
        cfg.experiment.total_steps,
        resumed=resume_from is not None,
        resume_step=None if resume_from is None else checkpoint_step(resume_from),
    )


def build_model(cfg: TrainConfig, materialise: bool = True) -> tuple[torch.nn.Module | None, Any]:
    """The initial policy (None unless `materialise`) and its tokenizer (seeded: the same config gives
    the same initial weights). A warm start with a seed of its own initialises from that seed, so runs
    that share the warm start share where it began."""
    seed = cfg.model.warmstart.resolved_seed(cfg.experiment.seed)
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.learner.num_threads)
    tokenizer = load_tokenizer(cfg.model.tokenizer_spec())
    if not materialise:
        return None, tokenizer
    return build_policy(cfg.model, tokenizer, seed=seed), tokenizer


def context_length(cfg: TrainConfig) -> int | None:
    """The model's context in tokens (max_position_embeddings, capped by a vLLM max_model_len), read from
    its config without loading weights; None when its config cannot be read here."""
    model = cfg.model
    if model.name == "tiny_minimax":
        context = int({**TINY_MINIMAX_DEFAULTS, **model.arch}["max_position_embeddings"])
    else:
        from transformers import AutoConfig

        try:
            source = smollm2_dir() if model.name == "smollm2_gguf" else model.name
            context = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
        except (OSError, ValueError):
            return None
    cap = dict(cfg.rollout.engine_kwargs).get("max_model_len")
    return min(x for x in (context, cap) if x is not None) if context or cap else None


def generation_budget(cfg: TrainConfig) -> tuple[int, str]:
    """The most new tokens a rollout may ask for, and the key that sets it."""
    if cfg.curriculum.enabled:
        return max(s.budget for s in cfg.curriculum.stages), "the largest curriculum.stages budget"
    return cfg.rollout.max_new_tokens, "rollout.max_new_tokens"


def prompt_limit(cfg: TrainConfig) -> tuple[int | None, str]:
    """The longest prompt that leaves room for the generation budget in the model's context (None: the
    context is unknown), and why, for messages."""
    context = context_length(cfg)
    if context is None:
        return None, ""
    budget, key = generation_budget(cfg)
    why = f"the model's context of {context} tokens leaves after a budget of {budget} ({key})"
    if budget >= context:
        raise ValueError(
            f"config error at {key.split()[-1]}: {budget} tokens fill the model's whole context "
            f"of {context} tokens ({cfg.model.name}), leaving no room for a prompt"
        )
    return context - budget, why


def check_prompts(cfg: TrainConfig, tokenizer: Any, splits: tuple[Any, Any], say: Any) -> None:
    """Every prompt fits the model's context with the budget (or is truncated, data.truncate_prompts):
    checked at data load, before any model is built or trained, naming the first one that does not."""
    limit, why = prompt_limit(cfg)
    if limit is None:
        return
    for dataset, split in zip(splits, ("train", "eval")):
        truncated = check_prompt_lengths(dataset, tokenizer, cfg.data, limit, why, split)
        if truncated:
            say(
                f"data.truncate_prompts: {truncated} {split} prompt(s) longer than {limit} tokens keep their "
                "last tokens"
            )


def truncation_limit(cfg: TrainConfig) -> int | None:
    return prompt_limit(cfg)[0] if cfg.data.truncate_prompts else None


def build_scorers(cfg: TrainConfig) -> tuple[Scorer, Scorer]:
    """The training and evaluation scorers: in the driver, or (reward.num_actors > 0) two views of one
    pool of Ray reward actors (shared actors, each view with its own counters)."""
    code = cfg.reward.code
    specs = [
        RewardSpec(r.name, r.weight, code.kwargs_for(r.name, r.kwargs), r.low, r.high)
        for r in cfg.reward.rewards
    ]
    kwargs: dict[str, Any] = {
        "timeout_s": cfg.reward.timeout_s,
        "strict": cfg.reward.strict,
        "max_workers": cfg.reward.max_workers,
        "stop_error_fraction": cfg.reward.stop_error_fraction,
        "isolation": cfg.reward.isolation,
    }
    if cfg.reward.num_actors > 0:
        from rewards.actor_pool import RewardActorPool

        start_ray(cfg)
        pool = RewardActorPool(
            specs, num_actors=cfg.reward.num_actors, cpus_per_actor=cfg.reward.cpus_per_actor, **kwargs
        )
        return pool.view("train"), pool.view("eval")
    return RewardScorer(specs, **kwargs), RewardScorer(specs, **kwargs)


def engine_kwargs(cfg: TrainConfig, model_dir: Path | None, threads: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        # vLLM gets the layout its release loads (a MiniMax checkpoint converted once; others as they are).
        "model_path": None if model_dir is None else str(_engine_model_dir(cfg, model_dir)),
        "dtype": cfg.rollout.dtype,
        "max_batch_size": cfg.rollout.max_batch_size,
        "num_threads": threads,
        "seed": cfg.experiment.seed,
        "device": "cuda" if cfg.rollout.num_gpus_per_worker > 0 else "cpu",
    }
    # Routing replay needs the experts chosen at rollout; only the hf engine records them (the samples
    # then carry them into TrainBatch.routed_experts, which the learner replays). Other engines would
    # reject the kwarg, and without recorded routing the learner's routers simply choose for themselves.
    if cfg.rollout.engine == "hf":
        kwargs["record_routing"] = cfg.learner.routing_replay
    return {**kwargs, **dict(cfg.rollout.engine_kwargs)}


def _engine_model_dir(cfg: TrainConfig, model_dir: Path) -> Path:
    return engine_dir(model_dir) if cfg.rollout.engine == "vllm" else model_dir


def build_eval_stage(
    cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, eval_split: Any
) -> RolloutStage:
    """An evaluation-only rollout stage over `model` itself, in this process (the warm start's judge)."""
    manager = LocalRolloutManager(
        cfg.rollout.engine,
        {**engine_kwargs(cfg, None, cfg.learner.num_threads), "model": model},
    )
    eval_set = eval_groups(eval_split, tokenizer, cfg.data)
    return RolloutStage(cfg, tokenizer, manager, build_scorers(cfg), None, eval_set)


def build_eval_only_stage(
    cfg: TrainConfig, run_dir: Path, model: torch.nn.Module, tokenizer: Any
) -> RolloutStage:
    """The rollout stage of `cispo-eval`: the configured engines over model.name, no prompt stream."""
    manager = build_rollout_manager(cfg, save_initial_policy(run_dir, model, tokenizer, resumed=False))
    eval_split = load_split(cfg.data, "eval")
    check_prompts(cfg, tokenizer, (eval_split.select([]), eval_split), print)
    eval_set = eval_groups(eval_split, tokenizer, cfg.data, truncation_limit(cfg))
    return RolloutStage(cfg, tokenizer, manager, build_scorers(cfg), None, eval_set)


def start_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray puts the driver's working directory first on its workers' sys.path: our packages are pinned there
    # before any task runs, so a user's rewards.py or rollout.py in the launch directory cannot replace them.
    runtime_env = {"worker_process_setup_hook": RAY_SETUP_HOOK}
    if cfg.cluster.ray_address:
        ray.init(address=cfg.cluster.ray_address, runtime_env=runtime_env)
    else:
        # A short temp dir: Ray's socket paths must stay under 108 characters. Logical CPUs only schedule
        # (every process sets its own thread count), so the instance is at least as big as the placement.
        ray.init(
            num_cpus=max(cfg.cluster.num_cpus, local_cpu_demand(cfg)),
            num_gpus=cfg.cluster.gpus_per_node,
            include_dashboard=False,
            log_to_driver=True,
            _temp_dir=ray_temp_dir(os.getpid()),  # what cispo.driver.reaper looks for after a kill -9
            runtime_env=runtime_env,
        )
    # Before anything is placed: a reservation the cluster cannot hold would otherwise wait in silence.
    check_cluster(cfg, ray.nodes(), ray.cluster_resources())


def ranked_learner(cfg: TrainConfig) -> bool:
    """Whether the learner backend runs on Ray actors of its own (its declared `ray_ranks`)."""
    return learner_backend(cfg.learner.backend).ray_ranks


def build_rollout_manager(
    cfg: TrainConfig, model_dir: Path, learner: Learner | None = None
) -> RolloutBackend:
    """The engines over `model_dir`; with a learner on Ray ranks (and cluster.weight_sync auto or
    broadcast), weights come to them straight from learner rank 0 over the weight channel."""
    kwargs = engine_kwargs(cfg, model_dir, cfg.rollout.threads_per_worker)
    if cfg.rollout.backend == "local":
        return LocalRolloutManager(cfg.rollout.engine, kwargs)
    start_ray(cfg)
    source = learner.weight_source() if learner is not None else None
    sync = None
    if source is not None and cfg.cluster.weight_sync != "object_store":
        sync = BroadcastWeightSync(source, backend="nccl" if cfg.rollout.num_gpus_per_worker else "gloo")
    return RolloutManager(
        cfg.rollout.engine,
        kwargs,
        num_workers=cfg.rollout.num_workers,
        num_cpus_per_worker=cfg.rollout.num_cpus_per_worker,
        num_gpus_per_worker=cfg.rollout.num_gpus_per_worker,
        max_restarts=cfg.rollout.max_restarts,
        worker_timeout_s=cfg.rollout.worker_timeout_s,
        timeout_factor=cfg.rollout.worker_timeout_factor,
        timeout_floor_s=cfg.rollout.worker_timeout_min_s,
        start_timeout_s=cfg.rollout.worker_start_timeout_s,
        restart_window_s=cfg.rollout.restart_window_s,
        placement_strategy=cfg.cluster.placement_strategy,
        weight_sync=sync,
    )


def save_initial_policy(
    run_dir: Path, model: torch.nn.Module | None, tokenizer: Any, resumed: bool, source: str = ""
) -> Path:
    """`<run dir>/policy_init`: what the engines and learner ranks load first, and the architecture and
    tokenizer every HF export takes. Written once: on resume the model here is a fresh init, and the
    engines get the checkpoint's weights by sync anyway. Without a model in this process (a learner on Ray
    ranks over a pretrained directory), its weight files are linked from `source`, not read."""
    model_dir = run_dir / INIT_DIR
    if resumed and (model_dir / "config.json").exists():
        return model_dir
    if model is not None:
        model.save_pretrained(model_dir)
    else:
        link_pretrained(Path(source), model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def build_learner_stage(cfg: TrainConfig, model: torch.nn.Module | None, model_dir: Path) -> Learner:
    """The learner. One on Ray ranks loads the policy from `model_dir` on each rank (the driver passes a
    loader, never the weights) and is placed by the cluster config; one in this process takes `model`."""
    kwargs: dict[str, Any] = {
        "cfg": cfg.learner,
        "algorithm": cfg.algorithm,
        "total_steps": cfg.experiment.total_steps,
        "temperature": cfg.rollout.temperature,
    }
    if not ranked_learner(cfg):
        return build_learner(cfg.learner.backend, model=model, **kwargs)
    start_ray(cfg)
    return build_learner(
        cfg.learner.backend,
        model=partial(load_policy, str(model_dir), cfg.model),
        placement_strategy=cfg.cluster.placement_strategy,
        cpus_per_rank=cfg.cluster.learner_cpus_per_rank,
        gpus_per_rank=1.0 if cfg.cluster.gpus_per_node else 0.0,
        threads_per_rank=max(1, cfg.learner.num_threads),
        zero_init=cfg.learner.zero_init,
        **kwargs,
    )


def write_placement(run_dir: Path, learner: Learner, manager: RolloutBackend, tracker: Tracker) -> None:
    """`<run dir>/placement.json` and one printed line per process: role, rank or slot, node."""
    import socket

    entries: list[PlacementEntry] = [{"role": "driver", "node_ip": _driver_ip(), "pid": os.getpid()}]
    entries += learner.placement
    entries += manager.placement()  # type: ignore[arg-type]
    (run_dir / "placement.json").write_text(
        json.dumps({"host": socket.gethostname(), "processes": entries}, indent=2)
    )
    for entry in entries:
        index = entry.get("rank", entry.get("slot", ""))
        where = entry.get("node_ip", entry.get("in", "?"))
        tracker.print(f"placement: {entry['role']} {index} on {where}".replace("  ", " "))


def _driver_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "local"


def build_stages(
    cfg: TrainConfig,
    run_dir: Path,
    model: torch.nn.Module | None,
    tokenizer: Any,
    splits: tuple[Any, Any],
    tracker: Tracker,
    resumed: bool,
) -> tuple[Stages, dict[str, float]]:
    """The learner (taking `model`), the rollout stage (engines loading the saved initial policy), the
    curriculum; returns them with construction facts for the first metrics row."""
    model_dir = save_initial_policy(run_dir, model, tokenizer, resumed, source=cfg.model.name)
    learner = build_learner_stage(cfg, model, model_dir)
    start = time.perf_counter()
    manager = build_rollout_manager(cfg, model_dir, learner)
    info = {
        "parameters": float(count_parameters(model_dir)),
        "time/rollout_start_s": time.perf_counter() - start,
    }
    write_placement(run_dir, learner, manager, tracker)
    limit = truncation_limit(cfg)
    stream = PromptStream(splits[0], tokenizer, cfg.data, cfg.algorithm.group_size, limit)
    eval_set = eval_groups(splits[1], tokenizer, cfg.data, limit)
    rollout = RolloutStage(cfg, tokenizer, manager, build_scorers(cfg), stream, eval_set)
    curriculum = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens)
    stages = Stages(rollout, learner, tracker, curriculum, get_advantage(cfg.algorithm.advantage))
    return stages, info
