"""Backends for the generative reward model (``rewards.genrm``): text in, the judge model's text out.

A backend turns judge prompts into the judge's replies, one per prompt and in order. A reply that could not
be had (the endpoint failed after its retries, a request timed out) comes back as the exception in that
slot, so one failed request costs its own sample only; :class:`JudgeTimeout` marks timeouts, which the
scorer counts apart from other errors.

Built-in backends, by name (``JUDGE_BACKENDS``, entry-point group ``cispo.judges``):

- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp's server, SGLang,
  the OpenAI API), ``max_concurrency`` requests at a time, per-request timeout, retries with backoff;
- ``hf``: a local Hugging Face model directory decoded greedily by the project's own engine
  (``rollout.hf_engine.HFEngine``) in this process.

Both keep a cache of replies keyed by the full request (:mod:`rewards.judges.cache`), in memory and, with
``cache_dir``, on disk, so a repeated identical request never reaches the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from cispo.core.registry import Registry, callable_from
from rewards.base import RewardError, RewardTimeout


class JudgeError(RewardError):
    """A judge request failed (after its retries), or the judge's reply could not be used."""


class JudgeTimeout(JudgeError, RewardTimeout, TimeoutError):
    """A judge request timed out on every attempt (counted with the scorer's timeouts)."""


@runtime_checkable
class JudgeBackend(Protocol):
    """What the generative reward model needs from a judge backend."""

    def generate(self, prompts: list[str]) -> list[str | Exception]:
        """One reply per prompt, in order; an Exception in a slot is that prompt's failure."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters since construction: requests, cache_hits, retries, timeouts, errors."""
        ...


JUDGE_BACKENDS: Registry[Callable[..., JudgeBackend]] = Registry(
    "judge backend",
    "cispo.judges",
    lazy={"openai": "rewards.judges.openai_compat:OpenAIJudge", "hf": "rewards.judges.hf_local:HFJudge"},
)


def available_judge_backends() -> list[str]:
    return JUDGE_BACKENDS.names()


def build_judge_backend(name: str, **kwargs: Any) -> JudgeBackend:
    """The backend ``name`` (registered name or ``pkg.mod:Class``) built with ``kwargs``; a TypeError names
    the backend when an argument is unknown or missing."""
    factory = callable_from(JUDGE_BACKENDS, name)
    try:
        backend = factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"judge backend {name!r}: {e}") from e
    if not isinstance(backend, JudgeBackend):
        raise TypeError(f"judge backend {name!r} built {backend!r}, which has no generate()/stats()")
    return backend
