"""Trained policies out, in Hugging Face format: `<run dir>/hf/` (safetensors + config + tokenizer), loadable
with `AutoModelForCausalLM.from_pretrained` and any engine that reads that format.

The run writes it with every checkpoint and at the end; `cispo-export <run dir | checkpoint dir>` writes it
for an existing run from a checkpoint (the torch learner's `learner.pt`, or a DeepSpeed ZeRO-2/3
checkpoint, gathered to full fp32 weights). The architecture config and tokenizer come from the run's
`policy_init/`, which is written once and never overwritten on resume.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

HF_DIR = "hf"
INIT_DIR = "policy_init"
WEIGHTS = "model.safetensors"


def export_hf(state_dict: dict[str, torch.Tensor], template_dir: Path, out_dir: Path) -> Path:
    """Writes `state_dict` as `out_dir/model.safetensors` next to `template_dir`'s config and tokenizer
    files. Written to a temporary sibling and renamed into place, so `out_dir` is never half-written."""
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in template_dir.iterdir():
        if (
            item.is_file()
            and not item.name.endswith((".safetensors", ".bin"))
            and item.name != "model.safetensors.index.json"
        ):
            shutil.copy2(item, tmp / item.name)
    save_file(_unshared(state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each storage once: a tied head shares the input embedding's tensor, and
    safetensors refuses shared storage; from_pretrained re-ties it from the config."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        out[name] = tensor.contiguous()
    return out


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full weights from a checkpoint directory of either learner."""
    if (checkpoint / "learner.pt").exists():
        return torch.load(checkpoint / "learner.pt", map_location="cpu", weights_only=False)["model"]
    if (checkpoint / "learner").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="learner")
        # The ranks wrap the policy in a log-prob module whose attribute is `policy`.
        return {name.removeprefix("policy."): tensor for name, tensor in state.items()}
    raise ValueError(f"{checkpoint} holds no learner state (learner.pt or a DeepSpeed 'learner' tag)")


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from either; a run dir means its latest complete checkpoint."""
    from cispo.driver.checkpoint import complete_checkpoints

    if (path / "COMPLETE").exists():
        return path.parent.parent, path
    found = complete_checkpoints(path)
    if not found:
        raise ValueError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint")
    return path, found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cispo-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="default: <run dir>/hf")
    args = parser.parse_args(argv)
    try:
        run_dir, checkpoint = resolve_checkpoint(args.path)
        template = run_dir / INIT_DIR
        if not (template / "config.json").exists():
            raise ValueError(f"{template} has no config.json to take the architecture from")
        out = export_hf(checkpoint_state_dict(checkpoint), template, args.out or run_dir / HF_DIR)
    except (ValueError, OSError) as err:
        print(f"cispo-export: {err}", file=sys.stderr)
        return 2
    print(f"cispo-export: {checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
