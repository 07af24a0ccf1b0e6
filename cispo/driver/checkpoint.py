"""Checkpoints: learner state (weights, optimizer, scheduler), RNG states, data cursor, step, curriculum.

Layout: <run dir>/checkpoints/step_<N>/ with the learner's files and trainer_state.pt. A checkpoint never
lies:
- it is written into step_<N>.partial/ and renamed into place only when whole, so a run killed mid-save,
  a full disk or a permission error leaves the previous checkpoints as they were (and the partial
  directory is removed, with the path and the OS error in the message);
- its `COMPLETE` marker is a manifest (JSON) with every file's size and SHA-256; resume verifies it and
  falls back to the newest intact checkpoint, warning with the bad file's name;
- weights that are not finite are never saved: the learner is asked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact) or read."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def save_checkpoint(run_dir: Path, step: int, learner: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    directory = run_dir / "checkpoints" / f"step_{step:07d}"
    if hasattr(learner, "weights_finite") and not learner.weights_finite():
        raise CheckpointError(f"refusing to write {directory}: the policy's weights are not finite")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        learner.save(str(partial))
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, partial / "trainer_state.pt")
        marker = json.dumps({"step": step, "files": _manifest(partial)}, indent=1)
        with (partial / MARKER).open("w") as f:
            f.write(marker)
            f.flush()
            os.fsync(f.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free if run_dir.exists() else 0
        where = getattr(err, "filename", None) or partial
        raise CheckpointError(
            f"writing checkpoint {directory} failed at {where}: {err} ({free:,} bytes free on that device); "
            "the previous checkpoints are intact"
        ) from err
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MARKER).exists())


def verify_checkpoint(directory: Path) -> str | None:
    """None if every file matches the manifest; else what is wrong, naming the file."""
    text = (directory / MARKER).read_text()
    if not text.strip():
        return None  # a marker from before manifests: nothing to check against
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError):
        return f"{directory / MARKER} is not a readable manifest"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest"
    return None


def find_resume_point(run_dir: Path, resume: str) -> Path | None:
    """resume: "auto" (the newest intact checkpoint in the run dir, if any), "never", or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        for candidate in reversed(complete_checkpoints(run_dir)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate
            print(f"warning: skipping checkpoint {candidate.name}: {problem}", file=sys.stderr, flush=True)
        return None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ValueError(f"config error at resume: {resume!r} is not a complete checkpoint directory")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"config error at resume: {problem}")
    return path


def checkpoint_step(directory: Path) -> int | None:
    """The step a checkpoint was taken at: from its manifest, else its directory name."""
    try:
        return int(json.loads((directory / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError):
        name = directory.name.removeprefix("step_")
        return int(name) if name.isdigit() else None


def load_checkpoint(directory: Path, learner: Any) -> dict[str, Any]:
    learner.load(str(directory))
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
