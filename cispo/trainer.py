"""The driver loop. It reads like the data flow:

prompt groups -> rollout -> rewards -> group advantages -> K off-policy minibatch updates -> weight sync
-> (eval, checkpoint, curriculum) -> next step.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cispo.batching import build_train_batch, split_minibatches
from cispo.checkpoint import find_resume_point, load_checkpoint, save_checkpoint
from cispo.components import Run, build_run
from cispo.config import TrainConfig
from cispo.tracking import plot_curves
from cispo.types import Sample, TrainBatch


def collect_rollouts(run: Run) -> tuple[list[Sample], dict[str, float]]:
    """Prompt groups -> samples with rewards. With dynamic sampling, groups whose rewards are all equal are
    replaced by fresh ones for up to `dynamic_sampling_rounds` extra rounds (DAPO)."""
    algo, wanted = run.cfg.algorithm, run.cfg.data.prompts_per_step
    start, kept, seen = time.perf_counter(), [], []
    for round_index in range(algo.dynamic_sampling_rounds + 1):
        samples = run.rollout.generate(
            run.stream.next_groups(wanted - len(kept) // algo.group_size), run.sampling()
        )
        run.score(samples)
        seen.extend(samples)
        groups = [samples[i : i + algo.group_size] for i in range(0, len(samples), algo.group_size)]
        last_round = round_index == algo.dynamic_sampling_rounds
        for group in groups:
            if last_round or len({s.reward for s in group}) > 1 or not algo.dynamic_sampling_rounds:
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
        **{f"reward/{k.removeprefix('reward/')}": v for k, v in run.scorer.metrics().items()},
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


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    resume_from = find_resume_point(run_dir, cfg.resume)
    run = build_run(cfg, run_dir, resumed=resume_from is not None)
    step, last_eval, generator = 0, float("nan"), torch.Generator().manual_seed(cfg.experiment.seed)
    if resume_from is not None:
        state = load_checkpoint(resume_from, run.learner)
        step, last_eval = state["step"], state["last_eval"]
        run.stream.load_state_dict(state["data"])
        run.curriculum.load_state_dict(state["curriculum"])
        generator.set_state(state["minibatch_rng"])
        run.rollout.update_weights(run.learner.state_dict_for_sync(), run.learner.version)
        run.tracker.print(f"resumed from {resume_from} at step {step}")
    started, pool = time.perf_counter(), ThreadPoolExecutor(max_workers=1)
    pending: Future | None = None
    try:
        if step == 0 and cfg.experiment.eval_every:
            last_eval = run.evaluate()
            run.tracker.log(0, {"eval/accuracy": last_eval, "eval/ran": 1, **run.info})
        while step < cfg.experiment.total_steps:
            step += 1
            tick = time.perf_counter()
            samples, metrics = pending.result() if pending else collect_rollouts(run)
            # One-step-off-policy: the next rollout runs on the workers while this batch trains.
            pending = pool.submit(collect_rollouts, run) if cfg.algorithm.pipeline_one_step else None
            batch, adv_metrics = make_train_batch(run, samples)
            metrics.update(adv_metrics)
            if batch is not None:
                metrics.update(update_policy(run, batch, generator))
                metrics["time/weight_sync_s"] = run.rollout.update_weights(
                    run.learner.state_dict_for_sync(), run.learner.version
                )
            if cfg.experiment.eval_every and step % cfg.experiment.eval_every == 0:
                last_eval, metrics["eval/ran"] = run.evaluate(), 1
            if run.curriculum.observe(metrics["response_length/p99"]):
                run.tracker.print(f"curriculum: step {step}, generation budget now {run.curriculum.budget}")
            elapsed = time.perf_counter() - tick
            metrics.update(
                {
                    "eval/accuracy": last_eval,
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
                save_checkpoint(
                    run_dir,
                    step,
                    run.learner,
                    {
                        "data": run.stream.state_dict(),
                        "curriculum": run.curriculum.state_dict(),
                        "last_eval": last_eval,
                        "minibatch_rng": generator.get_state(),
                    },
                    cfg.experiment.keep_checkpoints,
                )
            if cfg.experiment.max_time_s and time.perf_counter() - started > cfg.experiment.max_time_s:
                run.tracker.print(f"stopping at step {step}: experiment.max_time_s reached")
                break
        final = run.evaluate() if cfg.experiment.eval_every else last_eval
        if final == final:
            run.tracker.log(step, {"eval/accuracy": final, "eval/ran": 1, "eval/final": 1})
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)
        run.close()
    if cfg.logging.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return {
        "final_eval_accuracy": final,
        "steps": float(step),
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
