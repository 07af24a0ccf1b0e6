"""``eval``: the named evaluation sets (a section of TrainConfig in cispo.core.config).

Each set is prompts (the held-out split of `data`, or another split, file or hub dataset: `data` holds
DataConfig fields put over the run's own), a sampling (one greedy sample per prompt, or `samples` at a
`temperature`) and metrics (cispo.driver.eval_metrics). Every set is logged as eval/<name>/<metric>; the
first set's accuracy is also the run's held-out accuracy, `eval/accuracy` (keep_best, the W&B summary).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from cispo.core.checks import check_finite_fields
from cispo.core.checks import require as _require

# accuracy | mean@k | pass@k | pass@<j> (k: the set's samples per prompt; j <= samples)
EVAL_METRIC = re.compile(r"^(accuracy|mean@k|pass@k|pass@([1-9][0-9]*))$")
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# eval/<name>/... must not read as a key the first set logs without a set name (eval/reward/...).
RESERVED_SET_NAMES = ("reward", "step", "ran", "final", "accuracy", "best_accuracy", "best_step")


@dataclass
class EvalSetConfig:
    name: str = "held_out"
    # DataConfig fields over the run's `data` (source, path, split, prompt_key, answer_key, num_eval, ...);
    # empty: the run's own data.
    data: dict[str, Any] = field(default_factory=dict)
    # The split of that data the set reads (cispo.driver.data.load_split): "eval" is the held-out split.
    split: str = "eval"
    num: int = 0  # the first `num` prompts of the split; 0: all of them
    samples: int = 1  # per prompt
    temperature: float | None = None  # None: rollout.eval_temperature (0: greedy)
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])

    def check(self, key: str) -> None:
        from cispo.core.config import DataConfig  # this module is imported by cispo.core.config

        check_finite_fields(self, key)
        _require(bool(SET_NAME.match(self.name)), f"{key}.name", f"letters, digits, _ . -; got {self.name!r}")
        _require(self.name not in RESERVED_SET_NAMES, f"{key}.name", f"not one of {RESERVED_SET_NAMES}")
        known = [f.name for f in dataclasses.fields(DataConfig)]
        for name in self.data:
            _require(name in known, f"{key}.data.{name}", f"not a data field; one of {known}")
        _require(bool(self.split), f"{key}.split", "must not be empty")
        _require(self.num >= 0, f"{key}.num", "must be >= 0 (0: the whole split)")
        _require(self.samples >= 1, f"{key}.samples", "must be >= 1")
        _require(self.temperature is None or self.temperature >= 0, f"{key}.temperature", "must be >= 0")
        _require(
            self.temperature != 0 or self.samples == 1,
            f"{key}.samples",
            f"{self.samples} greedy samples per prompt are {self.samples} copies: set a temperature > 0",
        )
        for index, metric in enumerate(self.metrics):
            match = EVAL_METRIC.match(metric)
            where = f"{key}.metrics[{index}]"
            _require(match is not None, where, f"accuracy, mean@k, pass@k or pass@<j>; got {metric!r}")
            j = int(match.group(2)) if match and match.group(2) else self.samples
            _require(j <= self.samples, where, f"{metric} needs {j} samples a prompt, samples={self.samples}")


@dataclass
class EvalConfig:
    """The sets every evaluation runs (experiment.eval_every, the final one, cispo-eval), in order."""

    sets: list[EvalSetConfig] = field(default_factory=lambda: [EvalSetConfig()])

    def __post_init__(self) -> None:
        _require(len(self.sets) > 0, "eval.sets", "needs at least one set (experiment.eval_every=0: none)")
        for index, item in enumerate(self.sets):
            item.check(f"eval.sets[{index}]")
        names = [s.name for s in self.sets]
        _require(len(set(names)) == len(names), "eval.sets", f"names must be unique, got {names}")
