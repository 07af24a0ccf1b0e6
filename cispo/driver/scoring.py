"""Scoring as groups finish: a thread that decodes and scores each finished group the moment the rollout
stream hands it over (so reward scoring overlaps generation), and keeps it, with the scorer's counters for
exactly that group, until the loop takes it.

Counters are per group, not per interval: a step's reward metrics are those of the groups in its batch,
whatever else was scored in the meantime (groups of later steps, evaluation), so they do not depend on
timing and a resumed run logs what the uninterrupted one did.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cispo.core.types import PromptGroup, Sample
from rewards.base import RewardInput
from rewards.scorer import Scorer


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class ScoredGroup:
    """A finished, scored group and the scorer's counters for it alone."""

    key: Hashable
    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)
    chunks: int = 1


def score_samples(samples: list[Sample], scorer: Scorer, tokenizer: Tokenizer) -> dict[str, float]:
    """Decodes and scores samples in place (response_text, reward, reward_reason); the scorer's counters
    for this call."""
    for s in samples:
        s.response_text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
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
    for sample, result in zip(samples, scorer.score(inputs), strict=True):
        sample.reward, sample.reward_reason = float(result.score), result.reason
    return scorer.metrics()


def combine_group_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """The scorer's counters over several groups: `.../mean` keys are means over samples (weighted by each
    part's reward/samples), every other key is a count (summed)."""
    out: dict[str, float] = {}
    total = sum(p.get("reward/samples", 0.0) for p in parts)
    for part in parts:
        n = part.get("reward/samples", 0.0)
        for key, value in part.items():
            if key.endswith("/mean"):
                out[key] = out.get(key, 0.0) + (value * n / total if total else 0.0)
            else:
                out[key] = out.get(key, 0.0) + value
    return out


class ScoringThread:
    """Scores groups put into it, in arrival order, with the scorer each one names; `take(keys)` waits."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._inbox: queue.Queue[tuple[list[Hashable], list[list[Sample]], Scorer, int] | None] = (
            queue.Queue()
        )
        self._done: dict[Hashable, ScoredGroup] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reward-scoring", daemon=True)
        self._thread.start()

    def put(self, keys: list[Hashable], groups: list[list[Sample]], scorer: Scorer, chunks: int = 1) -> None:
        """Groups generated together (one job), scored in one call; the first carries the call's counters."""
        self._inbox.put((keys, groups, scorer, chunks))

    def add_scored(self, group: ScoredGroup) -> None:
        """A group scored before (restored from a checkpoint)."""
        with self._cond:
            self._done[group.key] = group
            self._cond.notify_all()

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            keys, groups, scorer, chunks = item
            try:
                metrics = score_samples([s for g in groups for s in g], scorer, self.tokenizer)
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits: the run stops with it
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                for i, (key, samples) in enumerate(zip(keys, groups, strict=True)):
                    self._done[key] = ScoredGroup(key, samples, metrics if i == 0 else {}, chunks)
                self._cond.notify_all()

    def take(self, keys: list[Hashable], alive: Callable[[], None] | None = None) -> list[ScoredGroup]:
        """The scored groups of `keys` (removed), in that order, once all are there. `alive()` is called
        while waiting and may raise (a failed rollout stream)."""
        with self._cond:
            while not all(k in self._done for k in keys):
                if self._error is not None:
                    raise self._error
                self._cond.wait(timeout=0.5)
                if alive is not None:
                    alive()
            return [self._done.pop(k) for k in keys]

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)


# ------------------------------------------------------------------------------------------ checkpoints


def sample_state(s: Sample) -> dict[str, Any]:
    """A scored sample as plain data (checkpoints load with weights_only=True): the group's prompt,
    reference and metadata come back from the data stream by its index."""
    return {
        "response_ids": torch.tensor(s.response_ids, dtype=torch.long),
        "behaviour_logprobs": torch.tensor(s.behaviour_logprobs, dtype=torch.float64),
        "finish_reason": s.finish_reason,
        "policy_version": s.policy_version,
        "token_versions": torch.tensor(s.token_versions, dtype=torch.long),
        "response_text": s.response_text,
        "reward": s.reward,
        "reward_reason": s.reward_reason,
        "routed_experts": s.routed_experts,
    }


def restore_sample(group: PromptGroup, state: dict[str, Any]) -> Sample:
    return Sample(
        group_index=group.index,
        prompt_ids=list(group.prompt_ids),
        response_ids=state["response_ids"].tolist(),
        behaviour_logprobs=state["behaviour_logprobs"].tolist(),
        finish_reason=state["finish_reason"],
        policy_version=int(state["policy_version"]),
        prompt_text=group.prompt_text,
        response_text=state["response_text"],
        reference=group.reference,
        metadata=dict(group.metadata),
        reward=float(state["reward"]),
        reward_reason=state["reward_reason"],
        routed_experts=state["routed_experts"],
        token_versions=state["token_versions"].tolist(),
    )
