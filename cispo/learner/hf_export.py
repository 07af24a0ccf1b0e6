"""Weights out in Hugging Face format, for both learners and `cispo-export`: a directory with the template's
config and tokenizer files and the weights as safetensors (one `model.safetensors` when they fit in a
shard, else numbered shards and an index), written to a sibling and renamed into place, so the directory
is never half-written. Extra small files (the driver's export marker) go in before the rename.

The writing is split in three so a DeepSpeed rank can gather its buckets between the steps:
`start_hf_dir` (the temporary sibling with the template's files), `HfShards.add` per tensor,
`finish_hf_dir` (shards and extra files written, the sibling renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

SHARD_BYTES = 4 * 2**30
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def unique_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each storage once, in state_dict order: a tied head shares the input
    embedding's tensor and safetensors refuses shared storage; loading re-ties it (the module's parameter
    is shared), as from_pretrained does from the config."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        out[name] = tensor.contiguous()
    return out


class HfShards:
    """Tensors cut into shards of about `shard_bytes` (a larger tensor makes a shard by itself). With
    `copy`, each is cloned as it is added (a gathered ZeRO-3 bucket is released before the write)."""

    def __init__(self, shard_bytes: int = SHARD_BYTES, copy: bool = True) -> None:
        self.shard_bytes, self.copy = shard_bytes, copy
        self.shards: list[dict[str, Tensor]] = [{}]
        self._size = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._size and self._size + nbytes > self.shard_bytes:
            self.shards.append({})
            self._size = 0
        tensor = tensor.detach().cpu().contiguous()
        self.shards[-1][name] = tensor.clone() if self.copy else tensor
        self._size += nbytes


def start_hf_dir(template_dir: str | Path, out_dir: str | Path) -> Path:
    """The temporary sibling of `out_dir`, fresh, holding `template_dir`'s files other than weights."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in Path(template_dir).iterdir():
        weights = item.name.endswith((".safetensors", ".bin")) or item.name == INDEX
        if item.is_file() and not weights:
            shutil.copy2(item, tmp / item.name)
    return tmp


def finish_hf_dir(
    tmp: Path, out_dir: str | Path, shards: HfShards, files: Mapping[str, str] | None = None
) -> Path:
    """Writes the shards and `files` (name -> text) into `tmp`, then renames it into place as `out_dir`."""
    from safetensors.torch import save_file

    if len(shards.shards) == 1:
        save_file(shards.shards[0], str(tmp / WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for index, shard in enumerate(shards.shards, start=1):
            name = f"model-{index:05d}-of-{len(shards.shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index_doc, indent=2))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    out = Path(out_dir)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_hf(
    state_dict: Mapping[str, Tensor],
    template_dir: str | Path,
    out_dir: str | Path,
    files: Mapping[str, str] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """`state_dict` (tied tensors written once) as a Hugging Face directory (see the module docstring)."""
    tmp = start_hf_dir(template_dir, out_dir)
    shards = HfShards(shard_bytes, copy=False)  # written before this returns: no copy of the model needed
    for name, tensor in unique_tensors(state_dict).items():
        shards.add(name, tensor)
    return finish_hf_dir(tmp, out_dir, shards, files)
