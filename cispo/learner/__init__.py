"""Learner backends, chosen by name: "torch" (one process) and "deepspeed" (ZeRO over N ranks).

A learner turns TrainBatches into optimizer steps and exports weights for the rollout engines:

    compute_logprobs(batch) -> Tensor [B, L]        no grad, the current policy's log-probs
    train_step(batch) -> dict[str, float]           one optimizer step over one minibatch
    state_dict_for_sync() -> dict[str, Tensor]      weights for the engines (full, unsharded)
    save(directory) / load(directory)               model, optimizer and scheduler state
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from cispo.types import TrainBatch


class Learner(Protocol):
    version: int

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor: ...
    def train_step(self, batch: TrainBatch) -> dict[str, float]: ...
    def state_dict_for_sync(self) -> dict[str, torch.Tensor]: ...
    def save(self, directory: str) -> None: ...
    def load(self, directory: str) -> None: ...
    def close(self) -> None: ...


_BACKENDS: dict[str, Callable[..., Learner]] = {}


def register_learner(name: str) -> Callable[[Callable[..., Learner]], Callable[..., Learner]]:
    def decorator(factory: Callable[..., Learner]) -> Callable[..., Learner]:
        _BACKENDS[name] = factory
        return factory

    return decorator


def build_learner(name: str, **kwargs: Any) -> Learner:
    _import_backends()
    if name not in _BACKENDS:
        raise ValueError(f"unknown learner backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name](**kwargs)


def _import_backends() -> None:
    from cispo.learner import torch_learner  # noqa: F401

    try:
        from cispo.learner import deepspeed_learner  # noqa: F401
    except ImportError:
        pass
