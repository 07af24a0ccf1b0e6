"""Checkpoints: learner state (weights, optimizer, scheduler), RNG states, data cursor, step, curriculum.

Layout: <run dir>/checkpoints/step_<N>/ with learner files and trainer_state.pt; a checkpoint is complete
only once its `COMPLETE` marker exists, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, learner: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    directory = run_dir / "checkpoints" / f"step_{step:07d}"
    if directory.exists():
        shutil.rmtree(directory)
    learner.save(str(directory))
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, directory / "trainer_state.pt")
    (directory / "COMPLETE").touch()
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "COMPLETE").exists())


def find_resume_point(run_dir: Path, resume: str) -> Path | None:
    """resume: "auto" (latest complete checkpoint in the run dir, if any), "never", or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise ValueError(f"config error at resume: {resume!r} is not a complete checkpoint directory")
    return path


def load_checkpoint(directory: Path, learner: Any) -> dict[str, Any]:
    learner.load(str(directory))
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
