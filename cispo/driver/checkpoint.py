"""Checkpoints: learner state (weights, optimizer, scheduler), RNG states, data cursor, step, curriculum.

Layout: <run dir>/checkpoints/step_<N>/ with the learner's files and trainer_state.pt. A checkpoint never
lies and never runs code:
- it is written into step_<N>.partial/ and renamed into place only when whole, so a run killed mid-save,
  a full disk or a permission error leaves the previous checkpoints as they were (and the partial
  directory is removed, with the path and the OS error in the message);
- its `COMPLETE` marker is a manifest (JSON) with the step, the run's identity and every file's size and
  SHA-256; a checkpoint whose manifest is missing, empty or lists no files is not complete. Resume and
  export verify it and fall back to the newest intact checkpoint, warning with the bad file's name;
- weights are safetensors and every other file is loaded with `torch.load(weights_only=True)`: plain
  tensors, numbers, strings and containers, never pickled objects;
- weights that are not finite are never saved: the learner is asked before anything is written.

A run directory holds one line of checkpoints (a branch), named by the run id in every manifest. A fresh
run in a used directory, or a resume from an earlier checkpoint, moves what is not on its branch (later
checkpoints, the `hf/` export they wrote, and for a fresh run the earlier run's logs) to
`<run dir>/discarded/<time>/`, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cispo.driver.diskspace import describe_device, disk_full_note

MARKER = "COMPLETE"
DISCARDED = "discarded"
HF_DIR = "hf"
HF_MARKER = "cispo_export.json"  # in hf/: the step and run id the exported weights come from
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "result.json", "curves.png")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact) or read."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain values (ints, lists, a uint8 tensor)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def load_plain(path: Path) -> Any:
    """A torch file of plain data (tensors, numbers, strings, containers): never unpickles an object."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler refusing a global is an UnpicklingError among others
        raise CheckpointError(f"{path} is not a checkpoint file of plain tensors and values: {err}") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def save_checkpoint(
    run_dir: Path,
    step: int,
    learner: Any,
    trainer_state: dict[str, Any],
    keep: int,
    run_id: str = "",
    eval_accuracy: float = float("nan"),
    keep_best: bool = False,
) -> Path:
    """The learner's state and `trainer_state` as checkpoint `step`; then all but the newest `keep`
    complete checkpoints are deleted (0: none), except, with `keep_best`, the one whose held-out accuracy
    (`eval_accuracy`: of an evaluation at its step, NaN for none) is the highest."""
    directory = run_dir / "checkpoints" / f"step_{step:07d}"
    if hasattr(learner, "weights_finite") and not learner.weights_finite():
        raise CheckpointError(f"refusing to write {directory}: the policy's weights are not finite")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        learner.save(str(partial))
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, partial / "trainer_state.pt")
        accuracy = eval_accuracy if eval_accuracy == eval_accuracy else None  # NaN: no evaluation yet
        manifest = {"step": step, "run_id": run_id, "eval_accuracy": accuracy, "files": _manifest(partial)}
        with (partial / MARKER).open("w") as f:
            f.write(json.dumps(manifest, indent=1, allow_nan=False))
            f.flush()
            os.fsync(f.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        where = getattr(err, "filename", None) or partial
        # The mount point and device, so a full disk names which one filled up (cispo.driver.diskspace).
        device = disk_full_note(run_dir, err) or f"on {describe_device(run_dir)}"
        raise CheckpointError(
            f"writing checkpoint {directory} failed at {where}: {err} ({device}); "
            "the previous checkpoints are intact"
        ) from err
    complete = complete_checkpoints(run_dir)
    best = best_checkpoint(complete) if keep_best else None
    for old in complete[:-keep] if keep > 0 else []:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def has_accuracy(directory: Path) -> bool:
    """Whether the checkpoint's manifest holds the held-out accuracy of an evaluation at its step."""
    return _scored(read_manifest(directory))


def best_checkpoint(checkpoints: list[Path]) -> Path | None:
    """The checkpoint with the highest held-out accuracy in its manifest (the later one on a tie)."""
    scored = [(manifest["eval_accuracy"], c) for c in checkpoints if _scored(manifest := read_manifest(c))]
    return max(scored, key=lambda pair: (pair[0], pair[1].name))[1] if scored else None


def _scored(manifest: dict[str, Any] | None) -> bool:
    return manifest is not None and isinstance(manifest.get("eval_accuracy"), (int, float))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MARKER).exists())


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing, empty, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest, or None when it is missing, empty or unreadable."""
    return _json_object(directory / MARKER)


def verify_checkpoint(directory: Path) -> str | None:
    """None if every file matches the manifest; else what is wrong, naming the file. A missing, empty or
    unreadable manifest, or one that lists no files, is a checkpoint that is not complete."""
    manifest = read_manifest(directory)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict) or not files:
        return f"{directory / MARKER} is missing, empty or lists no files: the checkpoint is not complete"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest"
    return None


def latest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies, warning about each newer one that does not."""
    for candidate in reversed(complete_checkpoints(run_dir)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        print(f"warning: skipping checkpoint {candidate.name}: {problem}", file=sys.stderr, flush=True)
    return None


def find_resume_point(run_dir: Path, resume: str) -> Path | None:
    """resume: "auto" (the newest intact checkpoint in the run dir, if any), "never", or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_intact(run_dir)
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ValueError(f"config error at resume: {resume!r} is not a complete checkpoint directory")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"config error at resume: {problem}")
    return path


def checkpoint_step(directory: Path) -> int | None:
    """The step a checkpoint was taken at: from its manifest, else its directory name."""
    manifest = read_manifest(directory)
    if manifest is not None and isinstance(manifest.get("step"), int):
        return manifest["step"]
    name = directory.name.removeprefix("step_")
    return int(name) if name.isdigit() else None


def checkpoint_run_id(directory: Path) -> str:
    """The id of the run that wrote the checkpoint ("" for one from before run ids)."""
    return str((read_manifest(directory) or {}).get("run_id") or "")


def load_checkpoint(directory: Path, learner: Any) -> dict[str, Any]:
    problem = verify_checkpoint(directory)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {directory}: {problem}")
    learner.load(str(directory))
    state = load_plain(directory / "trainer_state.pt")
    set_rng_state(state["rng"])
    return state


def read_hf_marker(hf_dir: Path) -> dict[str, Any] | None:
    return _json_object(hf_dir / HF_MARKER)


def hf_marker_files(step: int, run_id: str) -> dict[str, str]:
    """The marker naming the step and run id of an export, as a file to write into it (name -> text)."""
    return {HF_MARKER: json.dumps({"step": step, "run_id": run_id})}


def write_hf_marker(hf_dir: Path, step: int, run_id: str) -> None:
    for name, text in hf_marker_files(step, run_id).items():
        (hf_dir / name).write_text(text)


def claim_branch(run_dir: Path, resume_from: Path | None) -> tuple[str, list[str]]:
    """This run's id and what was moved off its branch (messages to print).

    A fresh run (no resume point) in a directory with checkpoints starts a new branch: the earlier run's
    checkpoints and `hf/` are moved aside, never mixed with the new ones. A resume from a checkpoint of this
    directory keeps its run id and moves aside the checkpoints after it (the abandoned branch) and an `hf/`
    exported from them. A resume from another directory's checkpoint starts a new branch here."""
    root = run_dir / "checkpoints"
    own = resume_from if resume_from is not None and resume_from.resolve().parent == root.resolve() else None
    run_id = (checkpoint_run_id(own) if own else "") or new_run_id()
    start = (checkpoint_step(own) if own else None) or 0
    listed = sorted(root.glob("step_*")) if root.exists() else []
    off_branch = [p for p in listed if p.is_dir() and (own is None or _dir_step(p) > start)]
    hf = run_dir / HF_DIR
    marker = read_hf_marker(hf)
    hf_off = hf.is_dir() and (
        marker is None or marker.get("run_id") != run_id or int(marker.get("step", -1)) > start
    )
    # A fresh run writes these anew; the earlier run's go with its checkpoints. (A resume keeps them: the
    # tracker cuts the logs back to the resumed step.)
    logs = [] if own else [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if not off_branch and not hf_off and not logs:
        return run_id, []
    into = run_dir / DISCARDED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    into = into.with_name(f"{into.name}-{new_run_id()[:4]}") if into.exists() else into
    (into / "checkpoints").mkdir(parents=True)
    for path in off_branch:
        os.replace(path, into / "checkpoints" / path.name)
    if hf_off:
        os.replace(hf, into / HF_DIR)
    for path in logs:
        os.replace(path, into / path.name)
    moved = ", ".join([p.name for p in off_branch] + ([HF_DIR] if hf_off else []) + [p.name for p in logs])
    why = (
        f"resume from {own.name}: discarding the later branch"
        if own
        else "a fresh run (resume=never, or no intact checkpoint to resume) in a used run directory"
    )
    return run_id, [f"{why}: moved {moved} to {into}"]


def _dir_step(path: Path) -> int:
    name = path.name.removeprefix("step_").removesuffix(".partial")
    return int(name) if name.isdigit() else -1
