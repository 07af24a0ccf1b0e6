"""``reward.code``: settings of the built-in code rewards (a section of RewardConfig in cispo.core.config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cispo.core.checks import require

CODE_REWARDS = ("code", "code_io")  # the rewards this section's settings reach (rewards/builtin.py)


@dataclass
class CodeRewardConfig:
    # The interpreter the code sandbox runs (a reward's own kwargs.python wins): "auto" is the set-up
    # script's .venv-sandbox (numpy, scipy, sympy, pytest), else a path. Docker runs its image's interpreter
    # (rewards/code.py: sandbox_python).
    python: str = "auto"

    def __post_init__(self) -> None:
        require(bool(str(self.python).strip()), "reward.code.python", "'auto' or an interpreter's path")

    def kwargs_for(self, reward: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` of the reward named ``reward`` with this section's defaults under them."""
        return {"python": self.python, **kwargs} if reward in CODE_REWARDS else dict(kwargs)
