"""The driver loop. It reads like the data flow:

prompt groups -> rollout -> rewards -> group advantages -> K off-policy minibatch updates -> weight sync
-> (eval, checkpoint, curriculum) -> next step.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cispo.core.config import TrainConfig
from cispo.core.types import Sample, TrainBatch
from cispo.driver.batch import build_train_batch, split_minibatches
from cispo.driver.build import Run, build_run
from cispo.driver.checkpoint import find_resume_point, load_checkpoint, save_checkpoint
from cispo.driver.tracking import plot_curves


def collect_rollouts(run: Run) -> tuple[list[Sample], dict[str, float]]:
    """Prompt groups -> samples with rewards. With dynamic sampling, groups whose rewards are all equal are
    replaced by fresh ones for up to `dynamic_sampling_rounds` extra rounds (DAPO)."""
    algo, wanted = run.cfg.algorithm, run.cfg.data.prompts_per_step
    start, kept, seen = time.perf_counter(), [], []
    for round_index in range(algo.dynamic_sampling_rounds + 1):
        with run.rollout_lock:
            groups = run.stream.next_groups(wanted - len(kept) // algo.group_size)
            samples = run.rollout.generate(groups, run.sampling())
            run.score(samples)
        seen.extend(samples)
        last_round = round_index == algo.dynamic_sampling_rounds
        for i in range(0, len(samples), algo.group_size):
            group = samples[i : i + algo.group_size]
            if last_round or len({s.reward for s in group}) > 1:
                kept.extend(group)
        if len(kept) >= wanted * algo.group_size:
            break
    return kept, _rollout_metrics(seen, kept, time.perf_counter() - start, run)


def _rollout_metrics(seen: list[Sample], kept: list[Sample], seconds: float, run: Run) -> dict[str, float]:
    lengths = np.array([len(s.response_ids) for s in kept], dtype=np.float64)
    rewards = np.array([s.reward for s in kept], dtype=np.float64)
    reasons = [s.finish_reason for s in kept]
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response_length/mean": float(lengths.mean()),
        "response_length/p99": float(np.percentile(lengths, 99)),
        "response_length/max": float(lengths.max()),
        "rollout/finish_eos": reasons.count("eos") / len(kept),
        "rollout/finish_length": reasons.count("length") / len(kept),
        "rollout/finish_repetition": reasons.count("repetition") / len(kept),
        "rollout/samples_generated": float(len(seen)),
        "rollout/new_tokens": float(sum(len(s.response_ids) for s in seen)),
        "rollout/policy_lag": float(run.learner.version - min(s.policy_version for s in kept)),
        "time/rollout_s": seconds,
        **run.scorer.metrics(),
    }


def make_train_batch(run: Run, samples: list[Sample]) -> tuple[TrainBatch | None, dict[str, float]]:
    """Group advantages; zero-variance groups carry no signal and are dropped when configured."""
    algo = run.cfg.algorithm
    rewards = torch.tensor([s.reward for s in samples])
    advantages = run.advantage_fn(rewards, algo.group_size, **algo.advantage_kwargs)
    keep = (
        advantages.keep_rows(algo.group_size)
        if algo.filter_zero_variance
        else torch.ones(len(samples), dtype=bool)
    )
    metrics = {
        "advantage/zero_variance_frac": advantages.zero_variance_groups.float().mean().item(),
        "advantage/abs_mean": advantages.values.abs().mean().item(),
    }
    if not keep.any():
        return None, metrics
    rows = keep.nonzero().squeeze(1).tolist()
    batch = build_train_batch([samples[i] for i in rows], advantages.values[keep], run.tokenizer.pad_token_id)
    return batch, metrics


def update_policy(run: Run, batch: TrainBatch, generator: torch.Generator) -> dict[str, float]:
    """K minibatch updates; the first minibatch's forward (before any update) gives the train/infer check."""
    start, totals = time.perf_counter(), {}
    minibatches = split_minibatches(batch, run.cfg.algorithm.updates_per_batch, generator)
    for index, minibatch in enumerate(minibatches):
        metrics = run.learner.train_step(minibatch, return_logprobs=index == 0)
        if index == 0:
            mask = minibatch.response_mask.bool()
            learner_lp, engine_lp = metrics.pop("_logprobs")[mask], minibatch.old_logprobs[mask]
            totals["train_infer/logprob_corr"] = _corr(learner_lp, engine_lp)
            totals["train_infer/logprob_max_abs_diff"] = (learner_lp - engine_lp).abs().max().item()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / len(minibatches)
    out = {f"cispo/{k}": v for k, v in totals.items() if not k.startswith("train_infer") and k != "entropy"}
    out.update({k: v for k, v in totals.items() if k.startswith("train_infer")})
    out["entropy"] = totals["entropy"]
    out["time/train_s"] = time.perf_counter() - start
    out["train/tokens"] = float(batch.num_response_tokens())
    return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


TRAIN_KEYS = (
    "cispo/loss",
    "cispo/clip_frac",
    "cispo/is_weight_mean",
    "entropy",
    "train_infer/logprob_corr",
    "time/train_s",
    "time/weight_sync_s",
)


class Loop:
    """The loop's own state, all of it checkpointed: step, last eval, the minibatch shuffling RNG."""

    def __init__(self, seed: int) -> None:
        self.step, self.last_eval = 0, float("nan")
        self.generator = torch.Generator().manual_seed(seed)

    def state(self, run: Run) -> dict:
        return {
            "data": run.stream.state_dict(),
            "curriculum": run.curriculum.state_dict(),
            "last_eval": self.last_eval,
            "minibatch_rng": self.generator.get_state(),
        }

    def restore(self, run: Run, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, run.learner)
        self.step, self.last_eval = state["step"], state["last_eval"]
        self.generator.set_state(state["minibatch_rng"])
        run.stream.load_state_dict(state["data"])
        run.curriculum.load_state_dict(state["curriculum"])
        run.rollout.update_weights(run.learner.state_dict_for_sync(), run.learner.version)
        run.tracker.print(f"resumed from {checkpoint} at step {self.step}")


def learn(run: Run, samples: list[Sample], loop: Loop) -> dict[str, float]:
    """Group advantages -> K minibatch updates -> new weights to the rollout engines."""
    batch, metrics = make_train_batch(run, samples)
    metrics.update(dict.fromkeys(TRAIN_KEYS, float("nan")))  # logged as null when no group had signal
    if batch is not None:
        metrics.update(update_policy(run, batch, loop.generator))
        weights = run.learner.state_dict_for_sync()
        metrics["time/weight_sync_s"] = run.rollout.update_weights(weights, run.learner.version)
    return metrics


def finish_step(run: Run, loop: Loop, samples: list[Sample], metrics: dict[str, float], tick: float) -> None:
    """Eval, curriculum, logging and checkpoint for one step."""
    cfg, step = run.cfg, loop.step
    if cfg.experiment.eval_every and step % cfg.experiment.eval_every == 0:
        loop.last_eval, metrics["eval/ran"] = run.evaluate(), 1
    if run.curriculum.observe(metrics["response_length/p99"]):
        run.tracker.print(f"curriculum: step {step}, generation budget now {run.curriculum.budget}")
    elapsed = time.perf_counter() - tick
    metrics.update(
        {
            "eval/accuracy": loop.last_eval,
            "curriculum/budget": run.curriculum.budget,
            "policy/version": run.learner.version,
            "time/step_s": elapsed,
            "throughput/tokens_per_s": metrics["rollout/new_tokens"] / elapsed,
        }
    )
    run.tracker.log(step, metrics)
    if step % cfg.logging.table_every == 0 or step == 1:
        run.tracker.log_samples(step, _table_rows(samples, cfg.logging.table_samples))
    if cfg.experiment.checkpoint_every and step % cfg.experiment.checkpoint_every == 0:
        save_checkpoint(run.run_dir, step, run.learner, loop.state(run), cfg.experiment.keep_checkpoints)


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    resume_from = find_resume_point(run_dir, cfg.resume)
    run = build_run(cfg, run_dir, resumed=resume_from is not None)
    loop = Loop(cfg.experiment.seed)
    if resume_from is not None:
        loop.restore(run, resume_from)
    started, pool, pending = time.perf_counter(), ThreadPoolExecutor(max_workers=1), None
    try:
        if loop.step == 0 and cfg.experiment.eval_every:
            loop.last_eval = run.evaluate()
            run.tracker.log(0, {"eval/accuracy": loop.last_eval, "eval/ran": 1, **run.info})
        while loop.step < cfg.experiment.total_steps:
            loop.step += 1
            tick = time.perf_counter()
            samples, metrics = pending.result() if pending else collect_rollouts(run)
            # One step off-policy: the next rollout runs on the workers while this batch trains.
            pending = pool.submit(collect_rollouts, run) if cfg.algorithm.pipeline_one_step else None
            metrics.update(learn(run, samples, loop))
            finish_step(run, loop, samples, metrics, tick)
            if cfg.experiment.max_time_s and time.perf_counter() - started > cfg.experiment.max_time_s:
                run.tracker.print(f"stopping at step {loop.step}: experiment.max_time_s reached")
                break
        if pending is not None:
            pending.result()  # let the in-flight rollout finish before the workers go away
        final = run.evaluate() if cfg.experiment.eval_every else loop.last_eval
        run.tracker.log(loop.step, {"eval/accuracy": final, "eval/ran": 1, "eval/final": 1})
    finally:
        pool.shutdown(wait=True)
        run.close()
    if cfg.logging.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return {
        "final_eval_accuracy": final,
        "steps": float(loop.step),
        "seconds": time.perf_counter() - started,
        **run.info,
    }


def _table_rows(samples: list[Sample], n: int) -> list[dict[str, object]]:
    return [
        {
            "prompt": s.prompt_text,
            "completion": s.response_text,
            "reference": str(s.reference),
            "reward": s.reward,
            "reason": s.reward_reason,
            "finish": s.finish_reason,
        }
        for s in samples[:n]
    ]
