"""What a curriculum stage sets, as one value that the learner and the rollout engines both read.

The curriculum (cispo/driver/curriculum.py) produces a `StageSettings` for its current stage; the loop
hands the same object to `Learner.apply_settings` and to the rollout stage's `apply_settings`, so the
two sides can never disagree about, say, the temperature the samples were drawn at and the temperature
their log-probs are recomputed at. Plain and frozen: it travels pickled to DeepSpeed ranks and Ray workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSettings:
    """One stage's settings. `None`: the run's own value (the config's) stays.

    budget: the most new tokens a rollout of this stage may ask for (always set).
    lr, grad_clip, normalizer: the learner's base lr (the schedule's factor is kept), gradient clip and
        token normaliser.
    loss_kwargs: the policy loss's kwargs in full (the stage's over algorithm.loss_kwargs, e.g.
        eps_high), or None to keep the learner's.
    temperature: sampling temperature of the engines, and the temperature the learner's log-probs use.
    repetition_stop_tokens: the engines' repetition early stop (0 disables it).
    """

    budget: int
    lr: float | None = None
    grad_clip: float | None = None
    normalizer: str | None = None
    loss_kwargs: dict[str, Any] | None = None
    temperature: float | None = None
    repetition_stop_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"StageSettings.budget must be >= 1, got {self.budget}")
        for key in ("lr", "temperature"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"StageSettings.{key} must be > 0, got {value}")
        for key in ("grad_clip", "repetition_stop_tokens"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"StageSettings.{key} must be >= 0, got {value}")
