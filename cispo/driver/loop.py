"""The driver loop. It reads like the data flow:

(warm start) -> prompt groups -> rollout -> rewards -> group advantages -> K off-policy minibatch updates
-> weight sync -> (eval, curriculum, logging, checkpoint) -> next step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from cispo.core.config import TrainConfig
from cispo.core.types import Sample
from cispo.driver.build import (
    Stages,
    build_eval_only_stage,
    build_model,
    build_stages,
    build_tracker,
    check_prompts,
    prompt_limit,
    ranked_learner,
)
from cispo.driver.checkpoint import (
    checkpoint_step,
    claim_branch,
    complete_checkpoints,
    find_resume_point,
    has_accuracy,
    hf_marker_files,
    load_checkpoint,
    read_hf_marker,
    save_checkpoint,
)
from cispo.driver.curriculum import LengthCurriculum
from cispo.driver.data import load_splits
from cispo.driver.eval_sets import build_eval_sets, check_eval_prompts, load_eval_sets, set_keys
from cispo.driver.export import HF_DIR, INIT_DIR, policy_dir
from cispo.driver.policy import builds_in_driver
from cispo.driver.rollout_stage import EvalResult, rollout_stats
from cispo.driver.tracking import plot_curves
from cispo.driver.update import (
    NonFiniteGuard,
    ZeroVarianceGuard,
    make_train_batch,
    train_keys,
    update_policy,
)
from cispo.driver.warmstart import warm_start_stage


class Loop:
    """The loop's own state, all of it checkpointed: step, last eval, the minibatch shuffling RNG."""

    def __init__(
        self, seed: int, max_nonfinite_steps: int = 3, zero_variance: ZeroVarianceGuard | None = None
    ) -> None:
        self.step, self.last_eval = 0, float("nan")
        self.run_id = ""  # the branch's id in every checkpoint manifest and hf/ marker (claim_branch)
        self.eval_step = -1  # the step of the last evaluation (a checkpoint's accuracy must be its own)
        self.last_sets: dict[str, float] = {}  # every set's numbers at the last evaluation (result.json)
        self.generator = torch.Generator().manual_seed(seed)
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.zero_variance = zero_variance or ZeroVarianceGuard(0)

    def state(self, stages: Stages) -> dict:
        return {
            "data": stages.rollout.state_dict(),  # the cursor, and the steps drawn ahead (scored)
            "curriculum": stages.curriculum.state_dict(),
            "last_eval": self.last_eval,
            "minibatch_rng": self.generator.get_state(),
        }

    def restore(self, cfg: TrainConfig, stages: Stages, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, stages.learner)
        self.step, self.last_eval = state["step"], state["last_eval"]
        self.generator.set_state(state["minibatch_rng"])
        stages.rollout.load_state_dict(state["data"])
        stages.curriculum.load_state_dict(state["curriculum"])
        apply_stage(cfg, stages)
        stages.rollout.sync_weights(stages.learner, self.step, force=True)
        stages.tracker.print(f"resumed from {checkpoint} at step {self.step}")


def rollout(cfg: TrainConfig, stages: Stages, step: int) -> tuple[list[Sample], dict[str, float]]:
    """Draws the steps up to step + max_staleness (their groups generate while the learner trains), then
    waits for this step's batch."""
    stages.rollout.schedule(step, stages.curriculum.budget, cfg.experiment.total_steps)
    samples, metrics = stages.rollout.collect(step, stages.learner.version)
    stages.tracker.log_batch(step, stages.rollout.last_batch)
    return samples, metrics


def learn(cfg: TrainConfig, stages: Stages, samples: list[Sample], loop: Loop) -> dict[str, float]:
    """Group advantages -> K minibatch updates -> new weights to the rollout engines."""
    pad = stages.rollout.tokenizer.pad_token_id
    budgets = [stages.rollout.last_budget] * len(samples)  # the budget they were generated with
    batch, metrics = make_train_batch(samples, cfg.algorithm, stages.advantage_fn, pad, budgets)
    reward_mean = sum(s.reward for s in samples) / max(1, len(samples))
    loop.zero_variance.observe(metrics["advantage/zero_variance_frac"], reward_mean, stages.tracker.print)
    metrics.update(dict.fromkeys(train_keys(cfg.algorithm.loss), float("nan")))
    if batch is not None:
        metrics.update(update_policy(stages.learner, batch, cfg.algorithm, loop.generator, loop.nonfinite))
    metrics["time/weight_sync_s"] = stages.rollout.sync_weights(stages.learner, loop.step)
    return metrics


def finish_step(
    cfg: TrainConfig,
    stages: Stages,
    loop: Loop,
    samples: list[Sample],
    metrics: dict[str, float],
    tick: float,
) -> None:
    """Eval, curriculum, logging and checkpoint for one step."""
    step = loop.step
    if cfg.experiment.eval_every and step % cfg.experiment.eval_every == 0:
        metrics.update(evaluate(cfg, stages, loop))
    if stages.curriculum.observe(rollout_stats(samples)):
        apply_stage(cfg, stages)
        stages.tracker.print(
            f"curriculum: step {step}, stage {stages.curriculum.stage} from the next step on: "
            f"budget {stages.curriculum.budget} ({stages.curriculum.signals})"
        )
    elapsed = time.perf_counter() - tick
    metrics.update(
        {
            "eval/accuracy": loop.last_eval,
            **stages.curriculum.logged(),
            "policy/version": stages.learner.version,
            "time/step_s": elapsed,
            "throughput/tokens_per_s": metrics["rollout/new_tokens"] / elapsed,
        }
    )
    stages.tracker.log(step, metrics)
    if step % cfg.logging.table_every == 0 or step == 1:
        stages.tracker.log_samples(step, _table_rows(samples, cfg.logging.table_samples))
    if cfg.experiment.checkpoint_every and step % cfg.experiment.checkpoint_every == 0:
        checkpoint(cfg, stages, loop)


def checkpoint(cfg: TrainConfig, stages: Stages, loop: Loop) -> None:
    """A checkpoint of this step, and the policy it holds exported to <run dir>/hf."""
    run_dir = stages.tracker.run_dir
    state = loop.state(stages)
    keep, best = cfg.experiment.keep_checkpoints, cfg.experiment.keep_best
    accuracy = loop.last_eval if loop.eval_step == loop.step else math.nan  # this step's own, or none
    saved = save_checkpoint(run_dir, loop.step, stages.learner, state, keep, loop.run_id, accuracy, best)
    export_policy(stages, loop)
    stages.tracker.log_directory(saved, "checkpoint", loop.step)  # W&B artifacts: logging.wandb_artifacts
    stages.tracker.log_directory(run_dir / HF_DIR, "model", loop.step)


def final_checkpoint(cfg: TrainConfig, stages: Stages, loop: Loop) -> None:
    """Every run ends with a complete checkpoint of its last step (a run shorter than checkpoint_every
    and one stopped by experiment.max_time_s included), so `hf/` and the newest checkpoint agree."""
    run_dir = stages.tracker.run_dir
    newest = complete_checkpoints(run_dir)
    last = newest[-1] if newest and checkpoint_step(newest[-1]) == loop.step else None
    # The final evaluation ran after this step's checkpoint: write it again, with its accuracy (keep_best).
    unscored = last is not None and loop.eval_step == loop.step and not has_accuracy(last)
    if last is None or unscored:
        checkpoint(cfg, stages, loop)
    elif read_hf_marker(run_dir / HF_DIR) != {"step": loop.step, "run_id": loop.run_id}:
        export_policy(stages, loop)  # e.g. a resume at the last step, after claim_branch moved hf/ aside


def apply_stage(cfg: TrainConfig, stages: Stages) -> None:
    """The current curriculum stage's settings, one StageSettings handed to the learner (lr, grad clip,
    normaliser, loss kwargs, temperature) and to the rollout stage (budget, temperature, repetition stop)
    alike; a no-op without a curriculum."""
    settings = stages.curriculum.stage_settings(cfg.algorithm.loss_kwargs)
    if settings is None:
        return
    stages.learner.apply_settings(settings)
    stages.rollout.apply_settings(settings)


def evaluate(cfg: TrainConfig, stages: Stages, loop: Loop) -> dict[str, float]:
    """Every evaluation set (eval.sets): the samples go to their own table (a `set` column), the numbers
    to eval/* keys only; the first set's accuracy is the held-out accuracy (eval/accuracy, keep_best)."""
    results = stages.rollout.evaluate_sets(stages.curriculum.budget, loop.step)
    loop.last_eval, loop.eval_step = results[0].accuracy, loop.step
    rows = [row for r in results for row in _eval_rows(r, cfg.logging.table_samples)]
    stages.tracker.log_samples(loop.step, rows, table="eval")
    loop.last_sets = sets_metrics(results)
    counters = {k: v for r in results for k, v in r.metrics.items()}
    return {"eval/accuracy": results[0].accuracy, "eval/ran": 1, **counters, **loop.last_sets}


def sets_metrics(results: list[EvalResult]) -> dict[str, float]:
    """eval/<set>/<metric> for every set. (The scorer's counters, result.metrics, are keyed eval/* for
    the first set, as the single held-out evaluation logged them, and eval/<set>/* for the others.)"""
    return {k: v for r in results for k, v in set_keys(r.name, r.set_metrics).items()}


def _eval_rows(result: EvalResult, n: int) -> list[dict[str, object]]:
    """The first `n` generations of a set (all of a prompt's samples together), each naming the set."""
    return [{**row, "set": result.name} for row in _table_rows(result.samples, n)]


def export_policy(stages: Stages, loop: Loop) -> None:
    """The current policy in Hugging Face format under <run dir>/hf (replaced atomically), with the step
    and run id it holds (so cispo-export never replaces it with an older one)."""
    run_dir = stages.tracker.run_dir
    # The marker goes in before the rename: the export and the step it names appear together.
    marker = hf_marker_files(loop.step, loop.run_id)
    stages.learner.save_hf(run_dir / INIT_DIR, run_dir / HF_DIR, marker)


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    if cfg.experiment.eval_only:
        return evaluate_only(cfg, run_dir)
    resume_from = find_resume_point(run_dir, cfg.resume)
    run_id, moved = claim_branch(run_dir, resume_from)  # before the tracker opens this branch's logs
    tracker = build_tracker(cfg, run_dir, resume_from)
    for message in moved:
        tracker.print(message)
    splits = load_splits(cfg.data)  # first: an empty or unreadable dataset fails before any model is built
    eval_data = load_eval_sets(cfg)  # the evaluation sets' too
    tracker.print(
        f"run dir {run_dir}; loading policy {cfg.model.name} (tokenizer {cfg.model.tokenizer_spec()})"
    )
    warm = cfg.model.warmstart.enabled and resume_from is None
    model, tokenizer = build_model(cfg, builds_in_driver(cfg.model, ranked_learner(cfg), warm))
    check_prompts(cfg, tokenizer, splits, tracker.print)  # before the warm start: a long prompt fails now
    check_eval_prompts(eval_data, tokenizer, *prompt_limit(cfg), tracker.print)
    info: dict[str, float] = {}
    if warm:
        info.update(warm_start_stage(cfg, model, tokenizer, splits, tracker.print))
    where = "in-process" if cfg.rollout.backend == "local" else f"{cfg.rollout.num_workers} Ray worker(s)"
    tracker.print(f"starting the {cfg.learner.backend} learner and the {cfg.rollout.engine} engine ({where})")
    stages, built = build_stages(cfg, run_dir, model, tokenizer, splits, tracker, resume_from is not None)
    held_out = stages.rollout.eval_set
    stages.rollout.eval_sets = build_eval_sets(eval_data, tokenizer, held_out, prompt_limit(cfg)[0])
    info.update(built)
    del model  # the learner holds its own (in this process) or loaded it on its ranks
    seconds = built["time/rollout_start_s"]
    tracker.print(f"policy: {info['parameters'] / 1e6:.2f}M parameters; rollout up in {seconds:.1f} s")
    algo = cfg.algorithm
    zero_variance = ZeroVarianceGuard(algo.max_zero_variance_steps, algo.zero_variance_action)
    loop = Loop(cfg.experiment.seed, cfg.learner.max_nonfinite_steps, zero_variance)
    loop.run_id = run_id
    apply_stage(cfg, stages)
    if resume_from is not None:
        loop.restore(cfg, stages, resume_from)
    started = time.perf_counter()
    try:
        run_loop(cfg, stages, loop, info)
        final_checkpoint(cfg, stages, loop)
    finally:
        stages.close()
    if cfg.logging.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return {
        "final_eval_accuracy": loop.last_eval,
        "steps": float(loop.step),
        "seconds": time.perf_counter() - started,
        **info,
        **loop.last_sets,  # eval/<set>/<metric> of the last evaluation
    }


def evaluate_only(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    """`cispo-eval`: model.name on every evaluation set (eval.sets; the default: the held-out split),
    written like a training run's evaluations (metrics.jsonl row with eval/*, every generation in
    eval_samples.jsonl), with no training; result.json holds eval/<set>/<metric> for each set."""
    model_dir = policy_dir(Path(cfg.model.name))
    if str(model_dir) != cfg.model.name:  # a run directory: its trained policy
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(model_dir)))
    tracker = build_tracker(cfg, run_dir, None)
    eval_data = load_eval_sets(cfg)
    model, tokenizer = build_model(cfg)
    stage = build_eval_only_stage(cfg, run_dir, model, tokenizer)
    try:
        check_eval_prompts(eval_data, tokenizer, *prompt_limit(cfg), tracker.print)
        stage.eval_sets = build_eval_sets(eval_data, tokenizer, stage.eval_set, prompt_limit(cfg)[0])
        results = stage.evaluate_sets(LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens).budget)
        first, sets = results[0], sets_metrics(results)
        counters = {k: v for r in results for k, v in r.metrics.items()}
        tracker.log(0, {"eval/accuracy": first.accuracy, "eval/ran": 1, "eval/final": 1, **counters, **sets})
        tracker.log_samples(0, [row for r in results for row in _eval_rows(r, len(r.samples))], table="eval")
        tracker.print(
            f"held-out accuracy of {cfg.model.name}: {first.accuracy:.4f} ({len(first.samples)} samples)"
        )
        for r in results:
            numbers = ", ".join(f"{k} {v:.4f}" for k, v in r.set_metrics.items())
            tracker.print(f"  eval set {r.name}: {numbers} ({len(r.samples)} samples)")
    finally:
        stage.close()
        tracker.close()
    return {
        "final_eval_accuracy": first.accuracy,
        "samples": float(len(first.samples)),
        **sets,  # eval/<set>/<metric>
    }


def run_loop(cfg: TrainConfig, stages: Stages, loop: Loop, info: dict[str, float]) -> None:
    started = time.perf_counter()
    evaluating = bool(cfg.experiment.eval_every)
    if loop.step == 0:
        # Step 0's weights: with steps drawn ahead (max_staleness > 0) an engine may have to load them
        # back after an evaluation moved it on.
        stages.rollout.sync_weights(stages.learner, 0, force=cfg.algorithm.max_staleness > 0)
        if evaluating:
            stages.tracker.log(0, {**evaluate(cfg, stages, loop), **info})
    while loop.step < cfg.experiment.total_steps:
        loop.step += 1
        tick = time.perf_counter()
        samples, metrics = rollout(cfg, stages, loop.step)
        metrics.update(learn(cfg, stages, samples, loop))
        finish_step(cfg, stages, loop, samples, metrics, tick)
        if cfg.experiment.max_time_s and time.perf_counter() - started > cfg.experiment.max_time_s:
            stages.tracker.print(f"stopping at step {loop.step}: experiment.max_time_s reached")
            break
    # The last step's own evaluation, when it had one, is the final one: no second identical pass.
    fresh = evaluating and loop.step % cfg.experiment.eval_every != 0
    final = evaluate(cfg, stages, loop) if fresh else {"eval/accuracy": loop.last_eval, "eval/ran": 1}
    final.update({"eval/final": 1, "system/driver_peak_rss_mb": driver_peak_rss_mb()})
    stages.tracker.log(loop.step, final)


def driver_peak_rss_mb() -> float:
    """This process's peak resident memory so far. VmHWM, not getrusage's ru_maxrss: the latter keeps the
    peak from before exec, i.e. that of whatever process forked this one (a launcher holding a model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
