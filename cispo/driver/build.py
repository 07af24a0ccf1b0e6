"""Builds every part of a run from the config and wires them together; the trainer loop only uses them.

This is (with the CLI) the one place that imports across packages: cispo <- rollout, rewards.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cispo.algo.advantages import AdvantageFn, get_advantage
from cispo.core.config import TrainConfig
from cispo.core.types import PromptGroup, Sample, SamplingParams
from cispo.driver.curriculum import LengthCurriculum
from cispo.driver.data import PromptStream, eval_groups, load_split
from cispo.driver.policy import build_policy, count_parameters, load_tokenizer
from cispo.driver.tracking import Tracker
from cispo.driver.warmstart import supervised_warmstart
from cispo.learner import Learner, build_learner
from rewards.base import RewardInput
from rewards.scorer import RewardScorer, RewardSpec
from rollout.manager import LocalRolloutManager, RolloutManager


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    tokenizer: Any
    learner: Learner
    rollout: Any
    scorer: RewardScorer
    stream: PromptStream
    eval_set: list[PromptGroup]
    tracker: Tracker
    curriculum: LengthCurriculum
    advantage_fn: AdvantageFn
    full_reward: float
    info: dict[str, float]
    # With one-step pipelining a rollout runs in a background thread; eval must not interleave with it.
    rollout_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def sampling(self, greedy: bool = False) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(
            max_new_tokens=self.curriculum.budget,
            temperature=1.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=1 if greedy else r.top_k,  # top-k 1 is exact greedy decoding
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_stop_tokens=r.repetition_stop_tokens,
            repetition_prob=r.repetition_prob,
        )

    def score(self, samples: list[Sample]) -> None:
        """Decodes and scores samples in place (reward, reward_reason, response_text)."""
        for s in samples:
            s.response_text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
        # response_length feeds length-aware rewards (DAPO's overlong penalty) in tokens, not characters.
        inputs = [
            RewardInput(
                s.prompt_text,
                s.response_text,
                s.reference,
                {**s.metadata, "response_length": len(s.response_ids)},
            )
            for s in samples
        ]
        for sample, result in zip(samples, self.scorer.score(inputs)):
            sample.reward, sample.reward_reason = float(result.score), result.reason

    def evaluate(self) -> float:
        """Held-out accuracy: the fraction of greedy responses that earn the full reward."""
        if not self.eval_set:
            return float("nan")
        with self.rollout_lock:
            samples = self.rollout.generate(self.eval_set, self.sampling(greedy=True))
            self.score(samples)
        return sum(s.reward >= self.full_reward - 1e-6 for s in samples) / len(samples)

    def close(self) -> None:
        self.tracker.close()
        self.rollout.shutdown()
        self.learner.close()


def _start_ray(cfg: TrainConfig, run_dir: Path) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.cluster.ray_address:
        ray.init(address=cfg.cluster.ray_address)
    else:
        # A short temp dir: Ray's socket paths must stay under 108 characters.
        ray.init(
            num_cpus=cfg.cluster.num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            _temp_dir=f"/tmp/ray_cispo_{os.getpid()}",
        )


def _engine_kwargs(cfg: TrainConfig, model_dir: Path, threads: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model_path": str(model_dir),
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
    return kwargs


def _warm_start(
    cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, scorer_run: Run, log
) -> dict[str, float]:
    """Runs (or loads) the supervised warm start, evaluating with an in-process engine."""
    local = LocalRolloutManager(
        cfg.rollout.engine,
        {**_engine_kwargs(cfg, Path(), cfg.learner.num_threads), "model_path": None, "model": model},
    )
    scorer_run.rollout = local

    def evaluate(m: torch.nn.Module) -> float:
        local.update_weights(m.state_dict(), 0)
        return scorer_run.evaluate()

    train_rows = load_split(cfg.data, "train")
    return supervised_warmstart(
        model, tokenizer, train_rows, evaluate, cfg.model, cfg.data, cfg.experiment.seed, log=log
    )


def build_run(cfg: TrainConfig, run_dir: Path, resumed: bool) -> Run:
    torch.manual_seed(cfg.experiment.seed)
    torch.set_num_threads(cfg.learner.num_threads)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_policy(cfg.model, tokenizer, seed=cfg.experiment.seed)
    algo = cfg.algorithm
    scorer = RewardScorer(
        [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in cfg.reward.rewards],
        timeout_s=cfg.reward.timeout_s,
        strict=cfg.reward.strict,
        max_workers=cfg.reward.max_workers,
    )
    train_split = load_split(cfg.data, "train")
    tracker = Tracker(
        cfg.logging,
        run_dir,
        cfg.experiment.name,
        dataclasses.asdict(cfg),
        cfg.experiment.total_steps,
        resumed=resumed,
    )
    run = Run(
        cfg,
        run_dir,
        tokenizer,
        learner=None,
        rollout=None,
        scorer=scorer,  # type: ignore[arg-type]
        stream=PromptStream(train_split, tokenizer, cfg.data, algo.group_size),
        eval_set=eval_groups(load_split(cfg.data, "eval"), tokenizer, cfg.data),
        tracker=tracker,
        curriculum=LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens),
        advantage_fn=get_advantage(algo.advantage),
        full_reward=sum(max(r.weight, 0.0) for r in cfg.reward.rewards),
        info={"parameters": float(count_parameters(model))},
    )
    tracker.print(
        f"policy: {cfg.model.name}, {count_parameters(model) / 1e6:.2f}M parameters; run dir {run_dir}"
    )
    if cfg.model.warmstart.enabled and not resumed:
        warm = _warm_start(cfg, model, tokenizer, run, tracker.print)
        run.info.update({f"warmstart/{k}": v for k, v in warm.items()})
    model_dir = run_dir / "policy_init"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run.learner = build_learner(
        cfg.learner.backend,
        model=model,
        cfg=cfg.learner,
        algorithm=algo,
        total_steps=cfg.experiment.total_steps,
        temperature=cfg.rollout.temperature,
    )
    t0 = time.perf_counter()
    if cfg.rollout.backend == "ray":
        _start_ray(cfg, run_dir)
        run.rollout = RolloutManager(
            cfg.rollout.engine,
            _engine_kwargs(cfg, model_dir, cfg.rollout.threads_per_worker),
            num_workers=cfg.rollout.num_workers,
            num_cpus_per_worker=cfg.rollout.num_cpus_per_worker,
            num_gpus_per_worker=cfg.rollout.num_gpus_per_worker,
        )
    else:
        run.rollout = LocalRolloutManager(
            cfg.rollout.engine, _engine_kwargs(cfg, model_dir, cfg.rollout.threads_per_worker)
        )
    run.info["time/rollout_start_s"] = time.perf_counter() - t0
    return run
