"""The report's staged thinking budget: 40K -> 48K -> ... -> 80K generation tokens.

The window widens when the policy needs it: once the p99 response length has reached advance_fraction
of the current window for `patience` consecutive steps (responses pile up against the limit), the next
stage's budget applies from the following rollout.
"""

from __future__ import annotations

from cispo.core.config import CurriculumConfig


class LengthCurriculum:
    def __init__(self, cfg: CurriculumConfig, default_budget: int) -> None:
        self.cfg, self.default_budget = cfg, default_budget
        self.stage = 0
        self._streak = 0

    @property
    def budget(self) -> int:
        return self.cfg.stages[self.stage] if self.cfg.enabled else self.default_budget

    def observe(self, p99_length: float) -> bool:
        """Records one step's p99 response length; returns True when the stage advanced."""
        if not self.cfg.enabled or self.stage >= len(self.cfg.stages) - 1:
            return False
        near_limit = p99_length >= self.cfg.advance_fraction * self.budget
        self._streak = self._streak + 1 if near_limit else 0
        if self._streak >= self.cfg.patience:
            self.stage += 1
            self._streak = 0
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"stage": self.stage, "streak": self._streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stage, self._streak = int(state["stage"]), int(state["streak"])
