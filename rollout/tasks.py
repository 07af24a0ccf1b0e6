"""The seam between whoever schedules generation and the engines that run it.

A `GenTask` is one prompt group's request (or the next chunk of a partial one) with the policy version it
must run with; a `RolloutBackend` runs tasks on numbered slots (Ray rollout workers, or one engine in this
process) and hands them back as they finish. `run_groups` drives a backend through one list of groups:
the synchronous `generate()` every manager offers. The streaming scheduler is rollout/stream.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cispo.core.types import Generation, PromptGroup, Sample, SamplingParams


@dataclass(eq=False)
class GenTask:
    """Sample `prompts` with `params` at policy `version`: exactly that version (`exact`), or at least it
    (a partial rollout continues on the newest weights). `key` is the scheduler's own id."""

    key: Hashable
    prompts: list[list[int]]
    params: SamplingParams
    version: int
    exact: bool = True

    @property
    def samples(self) -> int:
        return len(self.prompts)


@dataclass
class TaskResult:
    """A task that ended on `slot`: its generations (one per prompt, in order), or None when it was lost
    (its slot died or stalled and is being restarted): the scheduler runs it again."""

    task: GenTask
    slot: int
    generations: list[Generation] | None
    timings: dict[str, float] = field(default_factory=dict)
    failure: str = ""


class RolloutBackend(Protocol):
    """Engines in numbered slots. One task per slot at a time; weights are versioned.

    Object-store weights (`publish`): a slot loads the version a task needs just before running it, so
    slots may hold different versions at once. Broadcast weights (`broadcasts`): every slot holds the
    version of the last `broadcast`, which needs every slot idle."""

    num_slots: int
    latest: int  # the newest version published or broadcast
    broadcasts: bool
    last_timings: dict[str, float]

    def idle_slots(self) -> list[int]: ...

    def can_run(self, slot: int, task: GenTask) -> bool:
        """Whether `slot` can run `task` now: it holds the version the task needs, or can load it."""
        ...

    def run(self, slot: int, task: GenTask) -> None: ...

    def poll(self, timeout_s: float) -> list[TaskResult]: ...

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None: ...

    def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> float:
        """Publishes `weights` and loads them on every slot now (a slot holding `version` too)."""
        ...

    def release(self, below: int) -> None:
        """Versions older than `below` will not be asked for again: their copies may go."""
        ...

    def broadcast(self, version: int) -> float: ...

    def take_events(self) -> dict[str, float]: ...

    def placement(self) -> list[dict[str, object]]: ...

    def shutdown(self) -> None: ...


def group_seed(seed: int | None, index: int, chunk: int = 0) -> int | None:
    """A group's own random stream: a function of the call's seed, the group's data index and the chunk,
    never of the slot that runs it (a resubmitted group samples what the lost one would have)."""
    if seed is None:
        return None
    return ((seed * 1_000_003 + index) * 10_007 + chunk) % 2**63


def build_samples(groups: list[PromptGroup], generations: list[list[Generation]]) -> list[Sample]:
    """One Sample per generation, groups in order; `generations[i]` answers `groups[i]`."""
    samples: list[Sample] = []
    for group, gens in zip(groups, generations, strict=True):
        if len(gens) != group.group_size:
            raise RuntimeError(
                f"rollout: {len(gens)} generations for group {group.index} of {group.group_size}"
            )
        samples += [sample_of(group, gen) for gen in gens]
    return samples


def sample_of(group: PromptGroup, gen: Generation, token_versions: list[int] | None = None) -> Sample:
    versions = token_versions or []
    return Sample(
        group_index=group.index,
        prompt_ids=list(group.prompt_ids),
        response_ids=list(gen.response_ids),
        behaviour_logprobs=list(gen.logprobs),
        finish_reason=gen.finish_reason,
        policy_version=min(versions) if versions else gen.policy_version,
        prompt_text=group.prompt_text,
        reference=group.reference,
        metadata=dict(group.metadata),
        routed_experts=gen.routed_experts,
        token_versions=list(versions),
    )


def generation_timings(start: float, samples: list[Sample]) -> dict[str, float]:
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(s.response_ids) for s in samples)
    return {
        "generate_s": elapsed,
        "new_tokens": float(new_tokens),
        "tokens_per_s": new_tokens / max(elapsed, 1e-9),
    }


def split_groups(groups: list[PromptGroup], num_slots: int, per_task: int = 0) -> list[list[PromptGroup]]:
    """Consecutive runs of `per_task` groups, one engine call each (0: the groups split evenly over the
    slots, one task each, as static shards batch best on an engine without continuous batching)."""
    size = per_task or max(1, -(-len(groups) // max(1, num_slots)))
    return [groups[i : i + size] for i in range(0, len(groups), size)]


def run_groups(backend: RolloutBackend, groups: list[PromptGroup], params: SamplingParams) -> list[Sample]:
    """Every group once, split evenly over the slots (`split_groups`), each task on whichever slot is free
    at the backend's latest version and seeded by its first group; a lost task runs again and samples the
    same. Samples in the groups' order."""
    start = time.perf_counter()
    parts = split_groups(groups, backend.num_slots)
    queue = deque(
        GenTask(i, [list(g.prompt_ids) for g in part for _ in range(g.group_size)],
                per_group(params, part[0].index), backend.latest)
        for i, part in enumerate(parts)
    )  # fmt: skip
    done: dict[int, list[Generation]] = {}
    worker_s: list[float] = []
    while len(done) < len(parts):
        for slot in backend.idle_slots():
            if queue and backend.can_run(slot, queue[0]):
                backend.run(slot, queue.popleft())
        for result in backend.poll(1.0):
            if result.generations is None:
                queue.appendleft(result.task)
                continue
            done[int(result.task.key)] = result.generations  # type: ignore[call-overload]
            worker_s.append(result.timings.get("generate_s", 0.0))
    per_group_gens, rest = [], iter(g for i in range(len(parts)) for g in done[i])
    for group in groups:
        per_group_gens.append([next(rest) for _ in range(group.group_size)])
    samples = build_samples(groups, per_group_gens)
    backend.last_timings = {
        **generation_timings(start, samples),
        "worker_generate_s_max": max(worker_s, default=0.0),
        **backend.take_events(),
    }
    return samples


def per_group(params: SamplingParams, index: int, chunk: int = 0) -> SamplingParams:
    return dataclasses.replace(params, seed=group_seed(params.seed, index, chunk))
