"""Learner backends, chosen by name: "torch" (one process) and "deepspeed" (ZeRO over N ranks).

A learner turns TrainBatches into optimizer steps and exports weights for the rollout engines:

    compute_logprobs(batch) -> Tensor [B, L]        no grad, the current policy's log-probs
    train_step(batch, return_logprobs) -> StepResult one optimizer step over one minibatch
    train_steps(minibatches, return_logprobs)        K optimizer steps in one call (one StepResult each):
                                                     the same updates as K train_step calls, one request
    state_dict_for_sync() -> dict[str, Tensor]      weights for the engines (full, unsharded)
    weight_source() -> WeightSource | None          the sender of the weight channel (ranks that broadcast
                                                     to the engines themselves), or None
    save_hf(template_dir, out_dir, files)           the policy in Hugging Face format (atomic)
    save(directory) / load(directory)               model, optimizer and scheduler state
    apply_settings(StageSettings)                   a curriculum stage's settings, from the next step on
    placement                                       where its processes run (placement.json)

What the registry holds is a `LearnerBackend`: a factory (usually the class) that says, before anything is
built, whether its learner runs on Ray actors of its own (`ray_ranks`; the driver then passes a loader
and a placement, never the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cispo.core.placement import PlacementEntry
from cispo.core.registry import Registry
from cispo.core.stage import StageSettings
from cispo.core.types import StepResult, TrainBatch
from cispo.core.weight_channel import WeightSource


class Learner(Protocol):
    version: int
    placement: list[PlacementEntry]

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor: ...
    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult: ...
    def train_steps(
        self, minibatches: list[TrainBatch], return_logprobs: Sequence[bool] | None = None
    ) -> list[StepResult]: ...
    def state_dict_for_sync(self) -> dict[str, torch.Tensor]: ...
    def weight_source(self) -> WeightSource | None: ...
    def save_hf(
        self, template_dir: str | Path, out_dir: str | Path, files: Mapping[str, str] | None = None
    ) -> None: ...
    def save(self, directory: str) -> None: ...
    def load(self, directory: str) -> None: ...
    def close(self) -> None: ...
    def apply_settings(self, settings: StageSettings) -> None: ...
    def weights_finite(self) -> bool: ...


class LearnerBackend(Protocol):
    """A learner backend as LEARNERS holds it: builds a Learner from keyword arguments (the model or a
    loader, cfg, algorithm, ...) and says where that learner runs before it is built."""

    ray_ranks: bool  # True: on Ray actors of its own (a loader and a placement); False: in the driver

    def __call__(self, **kwargs: Any) -> Learner: ...


LEARNERS: Registry[LearnerBackend] = Registry(
    "learner backend",
    "cispo.learners",
    lazy={
        "torch": "cispo.learner.torch_learner:TorchLearner",
        "deepspeed": "cispo.learner.deepspeed_learner:DeepSpeedLearner",
    },
)


def register_learner(name: str) -> Callable[[Any], Any]:
    return LEARNERS.register(name)


def learner_backend(name: str) -> LearnerBackend:
    """The backend ``name`` (registered, lazy built-in, ``pkg.mod:Factory`` or entry point); ValueError
    naming it when it is not a LearnerBackend (not callable, or no boolean ``ray_ranks``)."""
    backend = LEARNERS.get(name)
    if not callable(backend):
        raise ValueError(f"learner backend {name!r} resolves to {backend!r}, which is not callable")
    # A plugin's declaration, checked once here so that every caller can read it as typed.
    if not isinstance(getattr(backend, "ray_ranks", None), bool):
        raise ValueError(
            f"learner backend {name!r} ({backend!r}) must say where it runs: give it a class attribute "
            "ray_ranks = False (in the driver, given the model) or True (on Ray actors of its own)"
        )
    return backend


def build_learner(name: str, **kwargs: Any) -> Learner:
    """Constructs the backend ``name`` (registered, lazy built-in, ``pkg.mod:Factory`` or entry point)."""
    return learner_backend(name)(**kwargs)
