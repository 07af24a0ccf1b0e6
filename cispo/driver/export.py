"""Trained policies out, in Hugging Face format: `<run dir>/hf/` (safetensors + config + tokenizer), loadable
with `AutoModelForCausalLM.from_pretrained` and any engine that reads that format.

The run writes it with every checkpoint and at the end (its `cispo_export.json` names the step and run id),
so `hf/` is the trained policy. `cispo-export <run dir | checkpoint dir>` writes it for an existing run from
a checkpoint (the torch learner's safetensors, or a DeepSpeed ZeRO-2/3 checkpoint, gathered to full fp32
weights); it says which step it exports and refuses to replace a newer export, or one of another run,
without `--force`. The architecture config and tokenizer come from the run's `policy_init/`, which is
written once and never overwritten on resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cispo.driver.checkpoint import (
    HF_DIR,
    MARKER,
    checkpoint_run_id,
    checkpoint_step,
    hf_marker_files,
    latest_intact,
    load_plain,
    read_hf_marker,
    verify_checkpoint,
)
from cispo.learner.hf_export import WEIGHTS, write_hf

INIT_DIR = "policy_init"

__all__ = ["HF_DIR", "INIT_DIR", "WEIGHTS", "export_hf", "main", "policy_dir"]


def export_hf(
    state_dict: dict[str, torch.Tensor],
    template_dir: Path,
    out_dir: Path,
    step: int | None = None,
    run_id: str = "",
) -> Path:
    """Writes `state_dict` as safetensors in `out_dir` next to `template_dir`'s config and tokenizer files
    (and, given the step, the marker naming it): cispo/learner/hf_export.py, the writer both learners'
    `save_hf` use. Written to a temporary sibling and renamed into place, so `out_dir` is never
    half-written."""
    files = hf_marker_files(step, run_id) if step is not None else None
    return write_hf(state_dict, template_dir, out_dir, files)


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full weights from a checkpoint directory of either learner."""
    if (checkpoint / WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / WEIGHTS))
    if (checkpoint / "learner.pt").exists():  # a checkpoint from before safetensors: plain tensors only
        return load_plain(checkpoint / "learner.pt")["model"]
    if (checkpoint / "learner").is_dir():
        from cispo.learner.ds_checkpoint import zero_checkpoint_weights

        return zero_checkpoint_weights(checkpoint)
    raise ValueError(f"{checkpoint} holds no learner state ({WEIGHTS} or a DeepSpeed 'learner' tag)")


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from either; a run dir means its newest intact checkpoint."""
    if (path / MARKER).exists():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ValueError(f"{path} is not an intact checkpoint: {problem}")
        return path.parent.parent, path
    found = latest_intact(path)
    if found is None:
        raise ValueError(f"{path} is neither a checkpoint nor a run directory with an intact checkpoint")
    return path, found


def refusal(out: Path, step: int, run_id: str) -> str | None:
    """Why exporting (step, run_id) over `out` would lose a newer or another run's policy; None if not."""
    if not out.exists():
        return None
    marker = read_hf_marker(out)
    if marker is None:
        return f"{out} exists and does not say which step it holds (no cispo_export.json)"
    if str(marker.get("run_id", "")) != run_id:
        other = marker.get("run_id")
        return f"{out} holds step {marker.get('step')} of another run (id {other!r}, not {run_id!r})"
    if int(marker.get("step", -1)) > step:
        return f"{out} holds step {marker['step']}, newer than this checkpoint's step {step}"
    return None


def policy_dir(path: Path) -> Path:
    """A run directory means its trained policy, `<run dir>/hf`; any other path is itself."""
    if not (path / "config.json").exists() and (path / HF_DIR / "config.json").exists():
        return path / HF_DIR
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cispo-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "path", type=Path, help="a run directory (its newest intact checkpoint) or a checkpoint"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: <run dir>/hf")
    parser.add_argument("--force", action="store_true", help="replace a newer export, or another run's")
    args = parser.parse_args(argv)
    try:
        run_dir, checkpoint = resolve_checkpoint(args.path)
        step, run_id = checkpoint_step(checkpoint), checkpoint_run_id(checkpoint)
        out = args.out or run_dir / HF_DIR
        template = run_dir / INIT_DIR
        if not (template / "config.json").exists():
            raise ValueError(f"{template} has no config.json to take the architecture from")
        problem = refusal(out, -1 if step is None else step, run_id)
        if problem is not None and not args.force:
            raise ValueError(f"{problem}; not overwriting it (--force to replace it with {checkpoint.name})")
        export_hf(checkpoint_state_dict(checkpoint), template, out, step, run_id)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"cispo-export: {err}", file=sys.stderr)
        return 2
    print(f"cispo-export: step {step} ({checkpoint}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
