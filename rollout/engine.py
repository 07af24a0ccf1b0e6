"""The inference-engine protocol and its registry.

An engine turns prompt token ids into sampled responses with the behaviour log-prob of every sampled token,
the finish reason and the policy version that produced it. Engines are plain in-process objects; Ray
workers (rollout/worker.py) wrap one each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from cispo.types import Generation, SamplingParams


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


_ENGINES: dict[str, Callable[..., Engine]] = {}
# Engines whose module is imported only when selected, so a missing optional dependency (vllm) only
# matters to whoever asks for that engine.
_LAZY_ENGINES: dict[str, str] = {"hf": "rollout.hf_engine", "vllm": "rollout.vllm_engine"}


def register_engine(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Class decorator: make an engine constructible by name through build_engine."""

    def decorator(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        if name in _ENGINES and _ENGINES[name] is not factory:
            raise ValueError(f"engine {name!r} is already registered by {_ENGINES[name]!r}")
        _ENGINES[name] = factory
        return factory

    return decorator


def available_engines() -> list[str]:
    return sorted(set(_ENGINES) | set(_LAZY_ENGINES))


def build_engine(name: str, **kwargs: Any) -> Engine:
    """Construct a registered engine. Unknown names raise ValueError listing the known ones."""
    if name not in _ENGINES and name in _LAZY_ENGINES:
        import importlib

        importlib.import_module(_LAZY_ENGINES[name])
    if name not in _ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known engines: {', '.join(available_engines())}")
    return _ENGINES[name](**kwargs)
