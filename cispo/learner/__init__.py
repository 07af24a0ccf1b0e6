"""Learner backends, chosen by name: "torch" (one process) and "deepspeed" (ZeRO over N ranks).

A learner turns TrainBatches into optimizer steps and exports weights for the rollout engines:

    compute_logprobs(batch) -> Tensor [B, L]        no grad, the current policy's log-probs
    train_step(batch, return_logprobs) -> StepResult one optimizer step over one minibatch
    train_steps(minibatches, return_logprobs)        K optimizer steps in one call (one StepResult each):
                                                     the same updates as K train_step calls, one request
    state_dict_for_sync() -> dict[str, Tensor]      weights for the engines (full, unsharded)
    save(directory) / load(directory)               model, optimizer and scheduler state
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from cispo.core.registry import Registry, callable_from
from cispo.core.types import StepResult, TrainBatch


class Learner(Protocol):
    version: int

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor: ...
    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult: ...
    def train_steps(
        self, minibatches: list[TrainBatch], return_logprobs: Sequence[bool] | None = None
    ) -> list[StepResult]: ...
    def state_dict_for_sync(self) -> dict[str, torch.Tensor]: ...
    def save(self, directory: str) -> None: ...
    def load(self, directory: str) -> None: ...
    def close(self) -> None: ...
    def apply_settings(self, **settings: object) -> None: ...
    def weights_finite(self) -> bool: ...


LEARNERS: Registry[Callable[..., Learner]] = Registry(
    "learner backend",
    "cispo.learners",
    lazy={
        "torch": "cispo.learner.torch_learner:TorchLearner",
        "deepspeed": "cispo.learner.deepspeed_learner:DeepSpeedLearner",
    },
)


def register_learner(name: str) -> Callable[[Callable[..., Learner]], Callable[..., Learner]]:
    return LEARNERS.register(name)


def build_learner(name: str, **kwargs: Any) -> Learner:
    """Constructs the backend ``name`` (registered, lazy built-in, ``pkg.mod:Factory`` or entry point)."""
    return callable_from(LEARNERS, name)(**kwargs)
