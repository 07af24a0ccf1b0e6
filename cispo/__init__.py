"""cispo: CISPO reinforcement learning for reasoning LLMs.

`cispo.train(overrides)` and `cispo.evaluate(model)` run what `cispo-train` and `cispo-eval` run
(see cispo/api.py); importing `cispo` itself loads nothing heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compose", "evaluate", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cispo import api

        return getattr(api, name)
    raise AttributeError(f"module 'cispo' has no attribute {name!r}")
