"""`cispo-convert`: a MiniMax-Text-01 / M1 checkpoint from one layout to another, one shard at a time.

Targets (cispo/models/minimax_layout.py describes the layouts and their sources):
- `native`: transformers' MiniMaxForCausalLM, what the learner loads. From the remote-code layout the
  weight shards are unchanged (linked or copied) and one small shard of the lightning layers' derived
  buffers is added; the published config.json is kept beside it as `cispo_remote_config.json`, so the way
  back restores it byte for byte.
- `remote`: the published remote-code layout (MiniMaxText01ForCausalLM, trust_remote_code).
- `vllm`: what vLLM 0.23 (the `gpu-minimax` environment) loads: the remote layout when its modelling files
  are at hand, else the native config plus the `rotary_dim` key vLLM reads; never the derived buffers.

Only one shard's tensors are in memory at a time; a shard whose tensors do not change is symlinked
(`--link`) or copied as a file, never decoded. The output is built in a temporary sibling directory and
renamed into place whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cispo.models.minimax_layout import (
    DEFAULT_AUTO_MAP,
    config_for_vllm,
    config_to_native,
    config_to_remote,
    derived_buffer,
    layout_of,
)

TARGETS = ("native", "remote", "vllm")
INDEX = "model.safetensors.index.json"
REMOTE_CONFIG = "cispo_remote_config.json"
BUFFER_SHARD = "cispo-lightning-buffers.safetensors"


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    return json.loads(path.read_text())


def weight_files(model_dir: Path) -> list[str]:
    """The safetensors shards, in index order (or the single model.safetensors)."""
    index = model_dir / INDEX
    if index.is_file():
        return list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in model_dir.glob("*.bin"))
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or {INDEX}"
        + (f" (only {found}: convert .bin checkpoints to safetensors first)" if found else "")
    )


def _modelling_files(model_dir: Path, auto_map: dict[str, str]) -> bool:
    return all((model_dir / f"{ref.split('.')[0]}.py").is_file() for ref in auto_map.values())


def target_config(src: Path, config: dict[str, Any], to: str) -> dict[str, Any]:
    """The config.json the `to` layout gets from `config` (the config of `src`)."""
    layout = layout_of(config)
    if layout is None:
        raise ValueError(
            f"{src}: model_type {config.get('model_type')!r} / architectures {config.get('architectures')} "
            "is not MiniMax-Text-01 / M1 (remote-code or transformers' MiniMaxForCausalLM)"
        )
    stash = src / REMOTE_CONFIG
    original = json.loads(stash.read_text()) if stash.is_file() else None
    if original is not None and config_to_native(original) != config:
        original = None  # the native config was changed since: derive the remote one from it instead
    if to == "native":
        return config_to_native(config, str(src / "config.json")) if layout == "remote" else config
    if layout == "remote":
        return config
    if original is not None and (to == "remote" or _modelling_files(src, original.get("auto_map", {}))):
        return original
    if to == "remote":
        return config_to_remote(config, DEFAULT_AUTO_MAP)
    return config_for_vllm(config)


def lightning_buffers(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The derived buffers of every lightning layer, computed by transformers' own methods (so they equal
    what MiniMaxForCausalLM builds and saves)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention as Lightning

    out: dict[str, torch.Tensor] = {}
    for i, kind in enumerate(config.get("layer_types") or []):
        if kind != "linear_attention":
            continue
        layer = SimpleNamespace(
            layer_idx=i, num_attention_heads=config["num_attention_heads"],
            num_hidden_layers=config["num_hidden_layers"], block_size=config.get("block_size", 256),
        )  # fmt: skip
        slope = Lightning.get_slope_rate(layer)  # type: ignore[arg-type]
        query, key, diagonal = Lightning.decay_factors(layer, slope)  # type: ignore[arg-type]
        values = {"slope_rate": slope, "query_decay": query, "key_decay": key, "diagonal_decay": diagonal}
        for name, value in values.items():
            out[f"model.layers.{i}.self_attn.{name}"] = value.to(torch.float32).contiguous()
    return out


def _write_shard(src: Path, out: Path, name: str, keep: list[str], all_keys: list[str], link: bool) -> int:
    """One shard: linked or copied whole when nothing is dropped, else rewritten with `keep` only."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if keep == all_keys:
        if link:
            (out / name).symlink_to((src / name).resolve())
        else:
            shutil.copyfile(src / name, out / name)
        with safe_open(str(src / name), framework="pt") as handle:
            return sum(_nbytes(handle, k) for k in keep)
    if not keep:
        return 0
    with safe_open(str(src / name), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in keep}
        metadata = handle.metadata() or {"format": "pt"}
    save_file(tensors, str(out / name), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _nbytes(handle: Any, key: str) -> int:
    part = handle.get_slice(key)
    dtype_bytes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1}
    return int(torch.Size(part.get_shape()).numel()) * dtype_bytes.get(part.get_dtype(), 1)


def _copy_small_files(src: Path, out: Path, skip: Iterable[str]) -> None:
    skipped = set(skip)
    for item in src.iterdir():
        if item.name in skipped or item.name.endswith((".safetensors", ".bin")) or not item.is_file():
            continue
        shutil.copy2(item, out / item.name)


def _write_weights(
    src: Path, out: Path, add: dict[str, torch.Tensor], drop: bool, link: bool
) -> dict[str, str]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for name in weight_files(src):
        with safe_open(str(src / name), framework="pt") as handle:
            keys = list(handle.keys())
        keep = [k for k in keys if not (drop and derived_buffer(k))]
        total += _write_shard(src, out, name, keep, keys, link)
        weight_map.update({k: name for k in keep})
    add = {k: v for k, v in add.items() if k not in weight_map}  # a source's own copies stay as they are
    if add:
        save_file(add, str(out / BUFFER_SHARD), metadata={"format": "pt"})
        weight_map.update({k: BUFFER_SHARD for k in add})
        total += sum(t.numel() * t.element_size() for t in add.values())
    if len(set(weight_map.values())) > 1 or (src / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def convert(src: Path | str, dst: Path | str, to: str, link: bool = False) -> Path:
    """Writes `src` in the `to` layout at `dst` (which must not exist) and returns `dst`."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise ValueError(f"cispo-convert: unknown target {to!r}; known: {', '.join(TARGETS)}")
    if dst.exists():
        raise FileExistsError(f"cispo-convert: {dst} already exists; give a new directory")
    config = read_config(src)
    new_config = target_config(src, config, to)
    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _copy_small_files(src, partial, skip=("config.json", INDEX, REMOTE_CONFIG))
        if to == "native" and layout_of(config) == "remote":
            (partial / REMOTE_CONFIG).write_text((src / "config.json").read_text())
        elif to == "native" and (src / REMOTE_CONFIG).is_file():
            shutil.copy2(src / REMOTE_CONFIG, partial / REMOTE_CONFIG)
        add = lightning_buffers(new_config) if to == "native" else {}
        _write_weights(src, partial, add, drop=to != "native", link=link)
        _write_config(src, partial, config, new_config)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _write_config(src: Path, out: Path, config: dict[str, Any], new_config: dict[str, Any]) -> None:
    stash = src / REMOTE_CONFIG
    if new_config is config:  # unchanged: the file itself, byte for byte
        shutil.copy2(src / "config.json", out / "config.json")
    elif stash.is_file() and new_config == json.loads(stash.read_text()):
        shutil.copy2(stash, out / "config.json")  # the published config, restored byte for byte
    else:
        (out / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cispo-convert",
        description="Convert a MiniMax-Text-01 / M1 checkpoint between the published remote-code layout, "
        "transformers' native MiniMaxForCausalLM layout, and the layout vLLM 0.23 loads.",
    )
    parser.add_argument(
        "source", help="a local model directory, or a hub id with a copy in the local hub cache"
    )
    parser.add_argument("dest", help="the new directory (must not exist)")
    parser.add_argument("--to", choices=TARGETS, required=True)
    parser.add_argument("--link", action="store_true", help="symlink unchanged shards instead of copying")
    args = parser.parse_args(argv)
    from cispo.models.loading import ModelNotFound, resolve_model_dir

    try:
        out = convert(resolve_model_dir(args.source), args.dest, args.to, link=args.link)
    except (ModelNotFound, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"cispo-convert: {error}", file=sys.stderr)
        return 2
    print(f"cispo-convert: wrote {args.to} layout to {out}")
    auto_map = read_config(out).get("auto_map") or {}
    if auto_map and not _modelling_files(out, auto_map):
        # The remote code is the checkpoint's own: it cannot be made here, only copied from a release.
        files = sorted(f"{ref.split('.')[0]}.py" for ref in auto_map.values())
        note = (
            f"cispo-convert: note: config.json's auto_map needs {files}, which {args.source} does not "
            "have: copy them from the published checkpoint before loading with trust_remote_code"
        )
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
