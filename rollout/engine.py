"""The inference-engine protocol and its registry.

An engine turns prompt token ids into sampled responses with the behaviour log-prob of every sampled token,
the finish reason and the policy version that produced it. Engines are plain in-process objects; Ray
workers (rollout/worker.py) wrap one each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from cispo.core.registry import Registry, callable_from
from cispo.core.types import Generation, SamplingParams


@runtime_checkable
class Engine(Protocol):
    """What the rollout layer needs from an inference engine.

    generate() returns one Generation per prompt, in the order given; a prompt repeated k times in the list
    is sampled k times independently (that is how a group of samples is requested).
    """

    version: int
    last_timings: dict[str, float]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


# Built-ins are imported only when selected, so a missing optional dependency (vllm) only matters to
# whoever asks for that engine.
ENGINES: Registry[Callable[..., Engine]] = Registry(
    "rollout engine",
    "cispo.engines",
    lazy={"hf": "rollout.hf_engine:HFEngine", "vllm": "rollout.vllm_engine:VLLMEngine"},
)


def register_engine(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Class decorator: make an engine constructible by name through build_engine."""
    return ENGINES.register(name)


def available_engines() -> list[str]:
    return ENGINES.names()


def build_engine(name: str, **kwargs: Any) -> Engine:
    """Construct an engine by name or ``package.module:Class`` (resolved in the process that builds it:
    a Ray worker resolves the same path the driver was given)."""
    return callable_from(ENGINES, name)(**kwargs)
