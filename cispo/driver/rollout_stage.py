"""The rollout stage: prompt stream -> rollout stream -> scored groups -> a step's batch; and evaluation.

It owns the data cursor (PromptStream), the generation stream over the engines (rollout/stream.py), the
scoring thread and the eval set. The loop asks it to schedule steps, for a step's batch, for an evaluation
and to sync weights; nothing else touches the engines.

The schedule (algorithm.max_staleness = k). At the start of step s the groups of every step up to s + k are
drawn from the data stream, each with the policy version its step is generated at: t - 1 - k for step t
(never below 0). Generation runs ahead while the learner trains; each group is scored as soon as it is
finished; step s's batch is its groups in data order (the order recorded with the batch), so which samples
a step trains on, and the version they come from, depend on the schedule only, never on timing. With k = 0
this is the synchronous loop. Dynamic sampling (DAPO) draws its extra rounds when the step's batch is
taken, at the newest version. A checkpoint waits for the groups in flight and keeps them (scored), so a
resumed run trains every prompt exactly once and, with `staleness_strategy=wait` and no partial rollouts,
logs what the uninterrupted run did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cispo.core.config import TrainConfig
from cispo.core.stage import StageSettings
from cispo.core.types import PromptGroup, RolloutStats, Sample, SamplingParams
from cispo.driver.data import PromptStream
from cispo.driver.eval_sets import EvalSet, held_out_set, score_set
from cispo.driver.scoring import (
    ScoredGroup,
    Scorer,
    ScoringThread,
    combine_group_metrics,
    restore_sample,
    sample_state,
)
from cispo.learner import Learner
from rewards.registry import full_score
from rollout.stream import FinishedGroup, GenerationStream, GroupJob
from rollout.tasks import RolloutBackend, per_group, split_groups

Key = tuple[str, int, int, int]  # (kind, step, round, index in the data stream or the eval set)


@dataclass
class EvalResult:
    """One set's evaluation: accuracy (correct samples over all), the scored samples, the eval scorer's
    own counters (eval/* keys for the first set, eval/<set>/* for the others), and the set's metrics
    (accuracy, pass@k, mean@k: cispo.driver.eval_metrics)."""

    accuracy: float
    samples: list[Sample] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    name: str = "held_out"
    set_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepPlan:
    step: int
    version: int
    budget: int
    rounds: list[list[Key]] = field(default_factory=list)


class RolloutStage:
    def __init__(
        self,
        cfg: TrainConfig,
        tokenizer: Any,
        manager: RolloutBackend | None,
        scorers: tuple[Scorer, Scorer],
        stream: PromptStream | None,
        eval_set: list[PromptGroup],
    ) -> None:
        self.cfg, self.tokenizer, self.manager = cfg, tokenizer, manager
        # Training and evaluation score with separate scorers, so eval samples never enter the counters
        # of a training step.
        self.scorer, self.eval_scorer = scorers
        self.stream, self.eval_set = stream, eval_set
        # What every evaluation runs: the held-out split, greedy, until the loop sets the run's eval.sets.
        self.eval_sets: list[EvalSet] = [held_out_set(eval_set)]
        self.settings: StageSettings | None = None  # the curriculum stage's (temperature, repetition stop)
        # A sample earns "correct" in evaluation when every reward gives its best.
        self.full_reward = full_score(cfg.reward.rewards)
        self.k = cfg.algorithm.max_staleness
        self.drop = cfg.rollout.staleness_strategy == "drop"
        self.plans: dict[int, StepPlan] = {}
        self.scheduled_through = 0
        self.version = 0  # the newest version the engines can have
        # step -> the learner version published at its end (step 0: the initial policy): the schedule's
        # versions, and how token versions turn into staleness in steps.
        self.published: dict[int, int] = {}
        self._groups: dict[Key, PromptGroup] = {}
        self._gen: GenerationStream | None = None
        self._scoring: ScoringThread | None = None
        self.dropped = 0
        self.last_batch: list[int] = []  # the data indices of the groups of the last batch taken, in order
        # The budget the last batch taken was generated with (its step's plan: with steps drawn ahead, the
        # stage's when the step was scheduled, not the current one): the window of DAPO's overlong shaping.
        self.last_budget = cfg.rollout.max_new_tokens

    # ---------------------------------------------------------------------------------- plumbing
    @property
    def gen(self) -> GenerationStream:
        if self._gen is None:
            if self.manager is None:
                raise RuntimeError("this rollout stage has no engines")
            self._scoring = ScoringThread(self.tokenizer)
            r = self.cfg.rollout
            chunk = r.partial_chunk_tokens or max(1, r.max_new_tokens // 4)
            self._gen = GenerationStream(self.manager, self._finished, r.partial, chunk)
        return self._gen

    @property
    def scoring(self) -> ScoringThread:
        _ = self.gen
        assert self._scoring is not None
        return self._scoring

    def _finished(self, done: FinishedGroup) -> None:
        """In the stream's thread: hand the job's groups to the scoring thread, with their keys and the
        scorer their kind uses."""
        kind, step, round_index, _ = done.key  # type: ignore[misc]
        keys: list[Key] = [(kind, step, round_index, g.index) for g in done.groups]
        per_group, rest = [], iter(done.samples)
        for g in done.groups:
            per_group.append([next(rest) for _ in range(g.group_size)])
        self.scoring.put(keys, per_group, self.eval_scorer if kind == "eval" else self.scorer, done.chunks)

    def _jobs(
        self,
        kind: str,
        step: int,
        round_index: int,
        groups: list[PromptGroup],
        params: SamplingParams,
        version: int,
        priority: float,
        exact: bool = True,
    ) -> list[GroupJob]:
        """The groups split into tasks by `split_groups` (rollout.groups_per_task), one job each, seeded by
        its first group: the split is fixed by the schedule, not by timing."""
        slots = self.manager.num_slots if self.manager is not None else 1
        jobs = []
        for part in split_groups(groups, slots, self.cfg.rollout.groups_per_task):
            key: Key = (kind, step, round_index, part[0].index)
            jobs.append(GroupJob(key, part, per_group(params, part[0].index), version, priority, exact=exact))
        return jobs

    def apply_settings(self, settings: StageSettings) -> None:
        """The curriculum stage's sampling settings, from the next scheduled step on."""
        self.settings = settings

    def sampling(
        self,
        budget: int,
        evaluation: bool = False,
        seed: int | None = None,
        eval_temperature: float | None = None,
    ) -> SamplingParams:
        """Training sampling, or evaluation sampling at `eval_temperature` (None: rollout.eval_temperature):
        greedy when that is 0."""
        r, s = self.cfg.rollout, self.settings
        eval_t = r.eval_temperature if eval_temperature is None else eval_temperature
        greedy = evaluation and eval_t == 0
        train_temperature = s.temperature if s is not None and s.temperature is not None else r.temperature
        temperature = eval_t if evaluation and not greedy else train_temperature
        stop = s.repetition_stop_tokens if s is not None and s.repetition_stop_tokens is not None else None
        return SamplingParams(
            max_new_tokens=budget,
            temperature=1.0 if greedy else temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=1 if greedy else r.top_k,  # top-k 1 is exact greedy decoding
            eos_token_ids=(self.tokenizer.eos_token_id,) if evaluation or r.stop_on_eos else (),
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_stop_tokens=r.repetition_stop_tokens if stop is None else stop,
            repetition_prob=r.repetition_prob,
            seed=seed,
        )

    def seed(self, step: int, round_index: int, salt: int = 0) -> int:
        return ((self.cfg.experiment.seed * 1_000_003 + step) * 1_009 + round_index * 2 + salt) % 2**63

    # ---------------------------------------------------------------------------------- the schedule
    def schedule(self, step: int, budget: int, total_steps: int) -> None:
        """Draws the groups of every step up to step + k (+1 with staleness_strategy=drop) not drawn yet."""
        if self.stream is None:
            raise RuntimeError("this rollout stage was built for evaluation only (no prompt stream)")
        last = min(total_steps, step + self.k + (1 if self.drop and self.k else 0))
        for t in range(max(step, self.scheduled_through + 1), last + 1):
            self.plans[t] = StepPlan(t, self._version_after(t - 1 - self.k), budget)
            self._draw(
                t, 0, self.cfg.data.prompts_per_step, budget, self.plans[t].version, exact=not self.drop
            )
            self.scheduled_through = t

    def _draw(
        self, step: int, round_index: int, n: int, budget: int, version: int, exact: bool = True
    ) -> None:
        assert self.stream is not None
        params = self.sampling(budget, seed=self.seed(step, round_index))
        groups = self.stream.next_groups(n)
        keys: list[Key] = [("train", step, round_index, g.index) for g in groups]
        self._groups.update(zip(keys, groups))
        self.plans[step].rounds.append(keys)
        jobs = self._jobs("train", step, round_index, groups, params, version if exact else 0, step, exact)
        self.gen.add(jobs)

    def _version_after(self, step: int) -> int:
        """The version published at the end of `step` (the oldest one known, for a step before it)."""
        if step in self.published:
            return self.published[step]
        return self.published[min(self.published)] if self.published else self.version

    def staleness(self, sample: Sample, step: int) -> int:
        """How many weight syncs older than the learner's (at `step`) the sample's oldest token is: the
        versions published since its own, up to the end of step - 1. Counted by version, not by step: a
        step that trained nothing (no group had signal) leaves the weights, and the samples' age, as they
        were."""
        newer = {v for t, v in self.published.items() if t <= step - 1 and v > sample.policy_version}
        return len(newer)

    def collect(self, step: int, learner_version: int) -> tuple[list[Sample], dict[str, float]]:
        """Step `step`'s scored batch (waiting for it). With dynamic sampling (DAPO), groups whose rewards
        are all equal are replaced by fresh ones for up to `dynamic_sampling_rounds` extra rounds."""
        algo, wanted = self.cfg.algorithm, self.cfg.data.prompts_per_step
        plan, start = self.plans[step], time.perf_counter()
        kept: list[ScoredGroup] = []
        seen: list[ScoredGroup] = []
        for round_index in range(algo.dynamic_sampling_rounds + 1):
            if round_index > 0:  # refills, drawn now, at the newest version
                self._draw(step, round_index, wanted - len(kept), plan.budget, learner_version)
            scored = self._take(plan.rounds[round_index], learner_version, plan.budget)
            seen += scored
            last = round_index == algo.dynamic_sampling_rounds
            kept += [g for g in scored if last or len({s.reward for s in g.samples}) > 1]
            if len(kept) >= wanted:
                break
        waited = time.perf_counter() - start
        del self.plans[step]
        samples = [s for g in kept for s in g.samples]
        metrics = rollout_metrics([s for g in seen for s in g.samples], samples, learner_version)
        metrics.update(combine_group_metrics([g.metrics for g in seen]))
        metrics.update(self._stream_metrics(samples, step, waited))
        metrics["rollout/groups"] = float(len(kept))
        metrics["rollout/budget"] = float(plan.budget)  # may differ from curriculum/budget when drawn ahead
        self.last_batch = [int(g.key[3]) for g in kept]  # type: ignore[index]
        self.last_budget = plan.budget
        return samples, metrics

    def _take(self, keys: list[Key], learner_version: int, budget: int) -> list[ScoredGroup]:
        """The scored groups of `keys`, in order; with staleness_strategy=drop, one staler than the bound
        is generated again at the newest version and waited for."""
        groups = self.scoring.take(list(keys), alive=self._alive)
        stale = [i for i, g in enumerate(groups) if self.drop and self._too_stale(g)]
        if stale:
            self.dropped += len(stale)
            step = int(groups[stale[0]].key[1])  # type: ignore[index]
            redo = [self._groups[groups[i].key] for i in stale]  # type: ignore[index]
            params = self.sampling(budget, seed=self.seed(step, 0, salt=2))
            # Keys stay the groups' own: the regenerated groups replace the dropped ones in place.
            jobs = self._jobs(
                "train", step, int(groups[stale[0]].key[2]), redo, params, learner_version, -0.5
            )  # type: ignore[index]
            self.gen.add(jobs)
            again = self.scoring.take([groups[i].key for i in stale], alive=self._alive)
            for i, group in zip(stale, again, strict=True):
                groups[i] = group
        for key in keys:
            self._groups.pop(key, None)
        return groups

    def _too_stale(self, group: ScoredGroup) -> bool:
        return max(self.staleness(s, int(group.key[1])) for s in group.samples) > self.k  # type: ignore[index]

    def _alive(self) -> None:
        self.gen.depth()  # raises when the stream stopped

    def _stream_metrics(self, samples: list[Sample], step: int, waited: float) -> dict[str, float]:
        staleness = [self.staleness(s, step) for s in samples] or [0]
        out = {
            "rollout/staleness_mean": float(np.mean(staleness)),
            "rollout/staleness_max": float(max(staleness)),
            "rollout/partial_frac": sum(bool(s.token_versions) for s in samples) / max(1, len(samples)),
            "throughput/queue_depth": float(self.gen.depth()),  # timing: how far generation ran ahead
            "rollout/stale_dropped": float(self.dropped),
            "time/learner_wait_s": waited,
            "time/rollout_s": waited,
        }
        self.dropped = 0
        self.last_batch: list[int] = []  # the data indices of the groups of the last batch taken, in order
        out.update(self.gen.stats.take())
        events = self.gen.call(self.manager.take_events) if self.manager is not None else {}
        for key in ("timeouts_total", "restarts_total"):  # worker health over the run
            if key in events:
                out[f"rollout/worker_{key}"] = float(events[key])
        return out

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, budget: int, step: int = 0) -> EvalResult:
        """The first set's evaluation (the held-out accuracy) at the newest version: the fraction of
        responses that earn the full reward."""
        return self.evaluate_sets(budget, step, self.eval_sets[:1])[0]

    def evaluate_sets(
        self, budget: int, step: int = 0, sets: list[EvalSet] | None = None
    ) -> list[EvalResult]:
        """Every set (default: self.eval_sets) at the newest version, all queued at once. Set i's groups
        are keyed and seeded as round i of the evaluation, so the first set draws what the single
        held-out evaluation always drew."""
        sets = self.eval_sets if sets is None else sets
        keys: list[list[Key]] = []
        for i, eval_set in enumerate(sets):
            keys.append([("eval", step, i, g.index) for g in eval_set.groups])
            if eval_set.groups:
                seed = self.seed(step, i, salt=1)
                params = self.sampling(budget, True, seed, eval_set.cfg.temperature)
                self.gen.add(self._jobs("eval", step, i, eval_set.groups, params, self.version, -1.0))
        results = []
        for i, eval_set in enumerate(sets):
            name = eval_set.cfg.name
            if not eval_set.groups:
                results.append(EvalResult(float("nan"), name=name))
                continue
            scored = self.scoring.take(list(keys[i]), alive=self._alive)
            prefix = "eval/" if i == 0 else f"eval/{name}/"
            counters = combine_group_metrics([g.metrics for g in scored])
            metrics = {f"{prefix}{k}": v for k, v in counters.items()}
            values = score_set(eval_set, [g.samples for g in scored], self.full_reward)
            samples = [s for g in scored for s in g.samples]
            results.append(EvalResult(values["accuracy"], samples, metrics, name, values))
        return results

    # ---------------------------------------------------------------------------------- weights
    def load_weights(self, weights: dict[str, Any], version: int) -> float:
        """Loads `weights` into every engine now, as `version` (even one they hold: the warm start's judge
        reloads version 0 as it trains); returns the seconds it took."""
        assert self.manager is not None
        manager = self.manager
        seconds = float(self.gen.call(lambda: manager.update_weights(weights, version)))
        self.version = version
        return seconds

    def sync_weights(self, learner: Learner, step: int, force: bool = False) -> float:
        """The learner's weights at the end of `step` to the engines (nothing to send when they did not
        change, unless `force`): straight from its rank 0 over the weight channel (every engine idle, jobs
        for older versions first) when the manager was built for that, else published through the object
        store for each engine to load before the task that needs them. Returns the seconds it took."""
        start = time.perf_counter()
        changed = force or learner.version != self.version
        self.published[step] = learner.version
        if changed and self.manager is not None and self.manager.broadcasts:
            self.gen.broadcast(learner.version)
        elif changed:
            self.gen.publish(learner.state_dict_for_sync(), learner.version)
        self.version = learner.version
        # The steps drawn ahead need the versions from the end of step - k on: older copies may go.
        keep = self._version_after(step - self.k)
        if not (self.manager is not None and self.manager.broadcasts):
            self.gen.release(keep)
        for old in [t for t in self.published if t < step - self.k - 1]:
            del self.published[old]
        return time.perf_counter() - start

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The data cursor and every step drawn ahead, with its groups scored (waiting for those in
        flight): what a resumed run needs to train each prompt exactly once, as the uninterrupted run."""
        assert self.stream is not None
        keys = [k for plan in self.plans.values() for rnd in plan.rounds for k in rnd]
        scored = self.scoring.take(keys, alive=self._alive) if keys else []
        for group in scored:
            self.scoring.add_scored(group)  # still this run's: put back
        return {
            **self.stream.state_dict(),
            "scheduled_through": self.scheduled_through,
            "published": [[t, v] for t, v in sorted(self.published.items())],
            "plans": [
                {"step": p.step, "version": p.version, "budget": p.budget} for p in self.plans.values()
            ],
            "groups": [
                {
                    "key": list(g.key),
                    "chunks": g.chunks,
                    "metrics": dict(g.metrics),
                    "samples": [sample_state(s) for s in g.samples],
                }
                for g in scored
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.stream is not None
        self.stream.load_state_dict({"cursor": state["cursor"]})
        self.scheduled_through = int(state.get("scheduled_through", 0))
        self.published = {int(t): int(v) for t, v in state.get("published", [])}
        for p in state.get("plans", []):
            self.plans[p["step"]] = StepPlan(int(p["step"]), int(p["version"]), int(p["budget"]))
        for g in state.get("groups", []):
            key: Key = (str(g["key"][0]), int(g["key"][1]), int(g["key"][2]), int(g["key"][3]))
            group = self.stream.group_at(key[3])
            plan = self.plans[key[1]]
            while len(plan.rounds) <= key[2]:
                plan.rounds.append([])
            plan.rounds[key[2]].append(key)
            self._groups[key] = group
            samples = [restore_sample(group, s) for s in g["samples"]]
            self.scoring.add_scored(ScoredGroup(key, samples, dict(g["metrics"]), int(g["chunks"])))

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        if self._scoring is not None:
            self._scoring.close()
        if self.manager is not None:
            self.manager.shutdown()
        for scorer in {id(s): s for s in (self.scorer, self.eval_scorer) if s is not None}.values():
            scorer.close()


def rollout_stats(kept: list[Sample]) -> RolloutStats:
    """What the curriculum reads of a step's batch: response lengths and the generation perplexity, exp of
    the mean negative behaviour log-prob per sampled token (its convergence signal)."""
    lengths = np.array([len(s.response_ids) for s in kept], dtype=np.float64)
    tokens = sum(len(s.behaviour_logprobs) for s in kept)
    nll = -sum(sum(s.behaviour_logprobs) for s in kept) / tokens if tokens else float("nan")
    return RolloutStats(
        p99_length=float(np.percentile(lengths, 99)),
        perplexity=math.exp(nll) if math.isfinite(nll) else float("nan"),
        mean_length=float(lengths.mean()),
        max_length=float(lengths.max()),
    )


def rollout_metrics(seen: list[Sample], kept: list[Sample], learner_version: int) -> dict[str, float]:
    stats = rollout_stats(kept)
    rewards = np.array([s.reward for s in kept], dtype=np.float64)
    reasons = [s.finish_reason for s in kept]
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response_length/mean": stats.mean_length,
        "response_length/p99": stats.p99_length,
        "response_length/max": stats.max_length,
        "rollout/perplexity": stats.perplexity,
        "rollout/finish_eos": reasons.count("eos") / len(kept),
        "rollout/finish_length": reasons.count("length") / len(kept),
        "rollout/finish_repetition": reasons.count("repetition") / len(kept),
        "rollout/samples_generated": float(len(seen)),
        "rollout/new_tokens": float(sum(len(s.response_ids) for s in seen)),
        "rollout/policy_lag": float(learner_version - min(s.policy_version for s in kept)),
    }
