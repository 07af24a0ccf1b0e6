"""The rollout stage: prompt stream -> rollout engines -> decoded, scored samples; and held-out evaluation.

It owns the data cursor (PromptStream), the rollout manager (Ray workers or an in-process engine), the
reward scorer and the eval set. The loop asks it for a step's samples, for an evaluation, and to load new
weights; nothing else touches the engines.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cispo.core.config import TrainConfig
from cispo.core.types import PromptGroup, Sample, SamplingParams
from cispo.driver.data import PromptStream
from rewards.base import RewardInput
from rewards.registry import full_score
from rewards.scorer import RewardScorer


@dataclass
class EvalResult:
    """One held-out evaluation: accuracy, the scored samples, and the eval scorer's own counters."""

    accuracy: float
    samples: list[Sample] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutStage:
    def __init__(
        self,
        cfg: TrainConfig,
        tokenizer: Any,
        manager: Any,
        scorers: tuple[RewardScorer, RewardScorer],
        stream: PromptStream | None,
        eval_set: list[PromptGroup],
    ) -> None:
        self.cfg, self.tokenizer, self.manager = cfg, tokenizer, manager
        # Training and evaluation score with separate scorers, so eval samples never enter the counters
        # that the next training step reports (reward/errors, per-reward means, ...).
        self.scorer, self.eval_scorer = scorers
        self.stream, self.eval_set = stream, eval_set
        # What the current curriculum stage changes in sampling (temperature, repetition_stop_tokens).
        self.overrides: dict[str, Any] = {}
        # A sample earns "correct" in evaluation when every reward gives its best (the top of its declared
        # range; a penalty's best is its 0).
        self.full_reward = full_score(cfg.reward.rewards)
        # With one-step pipelining a rollout runs in a background thread; eval must not interleave with it.
        self.lock = threading.Lock()

    def sampling(self, budget: int, evaluation: bool = False, seed: int | None = None) -> SamplingParams:
        """Training sampling, or evaluation sampling: greedy when rollout.eval_temperature is 0. `seed`
        makes the call's random stream a function of (experiment seed, step, round): a resumed run
        samples what the uninterrupted one did, whatever happened to the workers in between."""
        r = self.cfg.rollout
        greedy = evaluation and r.eval_temperature == 0
        train_temperature = self.overrides.get("temperature", r.temperature)
        temperature = r.eval_temperature if evaluation and not greedy else train_temperature
        return SamplingParams(
            max_new_tokens=budget,
            temperature=1.0 if greedy else temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=1 if greedy else r.top_k,  # top-k 1 is exact greedy decoding
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_stop_tokens=self.overrides.get("repetition_stop_tokens", r.repetition_stop_tokens),
            repetition_prob=r.repetition_prob,
            seed=seed,
        )

    def seed(self, step: int, round_index: int, salt: int = 0) -> int:
        return ((self.cfg.experiment.seed * 1_000_003 + step) * 1_009 + round_index * 2 + salt) % 2**63

    def score(self, samples: list[Sample], scorer: RewardScorer) -> None:
        """Decodes and scores samples in place (response_text, reward, reward_reason)."""
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
        for sample, result in zip(samples, scorer.score(inputs)):
            sample.reward, sample.reward_reason = float(result.score), result.reason

    def collect(self, budget: int, learner_version: int, step: int) -> tuple[list[Sample], dict[str, float]]:
        """One step's scored samples. With dynamic sampling (DAPO), groups whose rewards are all equal are
        replaced by fresh ones for up to `dynamic_sampling_rounds` extra rounds."""
        if self.stream is None:
            raise RuntimeError("this rollout stage was built for evaluation only (no prompt stream)")
        algo, wanted = self.cfg.algorithm, self.cfg.data.prompts_per_step
        start, kept, seen = time.perf_counter(), [], []
        for round_index in range(algo.dynamic_sampling_rounds + 1):
            with self.lock:
                groups = self.stream.next_groups(wanted - len(kept) // algo.group_size)
                samples = self.manager.generate(
                    groups, self.sampling(budget, seed=self.seed(step, round_index))
                )
                self.score(samples, self.scorer)
            seen.extend(samples)
            last_round = round_index == algo.dynamic_sampling_rounds
            for i in range(0, len(samples), algo.group_size):
                group = samples[i : i + algo.group_size]
                if last_round or len({s.reward for s in group}) > 1:
                    kept.extend(group)
            if len(kept) >= wanted * algo.group_size:
                break
        metrics = rollout_metrics(seen, kept, learner_version)
        metrics.update(self.scorer.metrics())
        timings = getattr(self.manager, "last_timings", {})
        for key in ("timeouts_total", "restarts_total"):  # worker health over the run, from the manager
            if key in timings:
                metrics[f"rollout/worker_{key}"] = float(timings[key])
        metrics["time/rollout_s"] = time.perf_counter() - start
        return kept, metrics

    def evaluate(self, budget: int, step: int = 0) -> EvalResult:
        """Held-out accuracy: the fraction of responses that earn the full reward."""
        if not self.eval_set:
            return EvalResult(float("nan"))
        with self.lock:
            params = self.sampling(budget, evaluation=True, seed=self.seed(step, 0, salt=1))
            samples = self.manager.generate(self.eval_set, params)
            self.score(samples, self.eval_scorer)
        accuracy = sum(s.reward >= self.full_reward - 1e-6 for s in samples) / len(samples)
        metrics = {f"eval/{key}": value for key, value in self.eval_scorer.metrics().items()}
        return EvalResult(accuracy, samples, metrics)

    def load_weights(self, weights: dict[str, Any], version: int) -> float:
        """New policy weights to every engine; returns the seconds it took."""
        return self.manager.update_weights(weights, version)

    def sync_weights(self, learner: Any) -> float:
        """The learner's current weights to every engine: straight from its rank 0 over the weight
        channel when the manager was built for that, else as a state dict through this process."""
        if getattr(self.manager, "broadcasts", False):
            return self.manager.broadcast_weights(learner.version)
        return self.load_weights(learner.state_dict_for_sync(), learner.version)

    def close(self) -> None:
        self.manager.shutdown()
        self.scorer.close()
        if self.eval_scorer is not self.scorer:
            self.eval_scorer.close()


def rollout_metrics(seen: list[Sample], kept: list[Sample], learner_version: int) -> dict[str, float]:
    lengths = np.array([len(s.response_ids) for s in kept], dtype=np.float64)
    tokens = sum(len(s.behaviour_logprobs) for s in kept)
    # Generation perplexity: exp of the mean negative behaviour log-prob per sampled token (the
    # curriculum's convergence signal).
    nll = -sum(sum(s.behaviour_logprobs) for s in kept) / tokens if tokens else float("nan")
    rewards = np.array([s.reward for s in kept], dtype=np.float64)
    reasons = [s.finish_reason for s in kept]
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response_length/mean": float(lengths.mean()),
        "response_length/p99": float(np.percentile(lengths, 99)),
        "response_length/max": float(lengths.max()),
        "rollout/perplexity": math.exp(nll) if math.isfinite(nll) else float("nan"),
        "rollout/finish_eos": reasons.count("eos") / len(kept),
        "rollout/finish_length": reasons.count("length") / len(kept),
        "rollout/finish_repetition": reasons.count("repetition") / len(kept),
        "rollout/samples_generated": float(len(seen)),
        "rollout/new_tokens": float(sum(len(s.response_ids) for s in seen)),
        "rollout/policy_lag": float(learner_version - min(s.policy_version for s in kept)),
    }
