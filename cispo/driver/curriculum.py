"""The report's staged thinking budget: 40K -> 48K -> ... -> 80K generation tokens, each stage with its own
settings (a lower eps_high and grad clip later on, as the report did against pattern collapse).

MiniMax-M1 advanced when the perplexity of the generated sequences had converged AND the p99 response
length approached the window. Both signals are computed every step and logged (curriculum/p99_fraction,
curriculum/perplexity, curriculum/perplexity_change, curriculum/length_streak); the stage advances when
both conditions hold (either can be switched off), never past the last stage, and its budget and
settings apply from the next rollout and update on. Everything here is checkpointed: a run resumed
mid-stage continues in that stage, with its streak and perplexity history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cispo.core.config import CurriculumConfig, StageConfig
from cispo.core.stage import StageSettings
from cispo.core.types import RolloutStats

# Stage settings that are logged as curriculum/<key> when a stage sets them.
SETTING_KEYS = ("lr", "grad_clip", "repetition_stop_tokens", "temperature")


class LengthCurriculum:
    def __init__(self, cfg: CurriculumConfig, default_budget: int) -> None:
        self.cfg, self.default_budget = cfg, default_budget
        self.stage = 0
        self._streak = 0
        self._perplexity: list[float] = []
        self.signals: dict[str, float] = {}

    @property
    def settings(self) -> StageConfig | None:
        return self.cfg.stages[self.stage] if self.cfg.enabled else None

    @property
    def budget(self) -> int:
        settings = self.settings
        return settings.budget if settings is not None else self.default_budget

    def observe(self, stats: RolloutStats) -> bool:
        """Records one step's rollout statistics (its p99 response length and generation perplexity);
        True when the stage advanced."""
        if not self.cfg.enabled:
            return False
        p99_length, perplexity = stats.p99_length, stats.perplexity
        near_limit = p99_length >= self.cfg.advance_fraction * self.budget
        self._streak = self._streak + 1 if near_limit else 0
        if math.isfinite(perplexity):
            self._perplexity = (self._perplexity + [perplexity])[-2 * self.cfg.perplexity_window :]
        change = self.perplexity_change()
        self.signals = {
            "curriculum/p99_fraction": p99_length / self.budget,
            "curriculum/length_streak": float(self._streak),
            "curriculum/perplexity": perplexity,
            "curriculum/perplexity_change": change,
        }
        length_ok = not self.cfg.length_condition or self._streak >= self.cfg.patience
        perplexity_ok = not self.cfg.perplexity_condition or change < self.cfg.perplexity_tolerance
        if self.stage >= len(self.cfg.stages) - 1 or not (length_ok and perplexity_ok):
            return False
        self.stage += 1
        self._streak, self._perplexity = 0, []
        return True

    def perplexity_change(self) -> float:
        """|mean of the last window - mean of the window before| / the latter; inf until both are full."""
        w = self.cfg.perplexity_window
        if len(self._perplexity) < 2 * w:
            return math.inf
        before, last = sum(self._perplexity[:w]) / w, sum(self._perplexity[w:]) / w
        return abs(last - before) / max(abs(before), 1e-12)

    def stage_settings(self, loss_kwargs: Mapping[str, Any]) -> StageSettings | None:
        """What this stage sets, for the learner and the engines alike (None without a curriculum): its
        budget, every setting the stage gives (unset: None, the run's own), and the policy loss's kwargs in
        full, the stage's merged over the run's `loss_kwargs`."""
        stage = self.settings
        if stage is None:
            return None
        return StageSettings(
            budget=stage.budget,
            lr=stage.lr,
            grad_clip=stage.grad_clip,
            normalizer=stage.normalizer,
            loss_kwargs={**loss_kwargs, **stage.loss_kwargs},
            temperature=stage.temperature,
            repetition_stop_tokens=stage.repetition_stop_tokens,
        )

    def logged(self) -> dict[str, float]:
        """curriculum/stage, curriculum/budget and every value the current stage overrides."""
        out = {"curriculum/stage": float(self.stage), "curriculum/budget": float(self.budget), **self.signals}
        settings = self.settings
        if settings is not None:
            out.update({f"curriculum/{k}": float(getattr(settings, k)) for k in SETTING_KEYS
                        if getattr(settings, k) is not None})  # fmt: skip
            out.update({f"curriculum/{k}": float(v) for k, v in settings.loss_kwargs.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "streak": self._streak, "perplexity": list(self._perplexity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self._streak = int(state["stage"]), int(state["streak"])
        self._perplexity = [float(x) for x in state.get("perplexity", [])]
