"""Where a model comes from, offline: `model.name` as a local directory, a hub-cache entry, or a hub id
resolved to its local snapshot; and the layout each side gets (the learner: transformers' native class;
the vLLM engine: what vLLM 0.23 loads), converted on the fly into a cache keyed by the source's contents.

Nothing is downloaded here: a hub id with no local copy is an error naming the cache paths tried.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from cispo.models.convert import INDEX, convert, read_config, weight_files
from cispo.models.minimax_layout import NATIVE_MODEL_TYPE, layout_of


class ModelNotFound(FileNotFoundError, ValueError):
    """`model.name` names no local model directory and no hub-cache snapshot (a config error: the CLI
    prints it as one line and exits 2)."""


def hub_cache_dirs() -> list[Path]:
    """The Hugging Face hub caches to look in, in huggingface_hub's order of precedence (read now, so a
    changed environment counts)."""
    home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"
    candidates = [
        os.environ.get("HF_HUB_CACHE"),
        os.environ.get("HUGGINGFACE_HUB_CACHE"),
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None,
        str(home / "hub"),
    ]
    return list(dict.fromkeys(Path(c).expanduser() for c in candidates if c))


def _snapshot(repo: Path) -> Path | None:
    """The snapshot refs/main points at, else the newest snapshot that has a config.json."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = repo / "snapshots" / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    snapshots = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def resolve_model_dir(name: str) -> Path:
    """A local directory with a config.json for `name`: the path itself, or the hub-cache snapshot of a hub
    id ("org/name"). Raises ModelNotFound naming every place looked at."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFound(f"config error at model.name: {name!r}: the directory {path} has no config.json")
    tried = [str(path)]
    parts = name.strip("/").split("/")
    if len(parts) == 2 and all(parts):
        for cache in hub_cache_dirs():
            repo = cache / f"models--{parts[0]}--{parts[1]}"
            found = _snapshot(repo)
            if found is not None:
                return found
            tried.append(f"{repo}/snapshots/<revision>/config.json")
    raise ModelNotFound(
        f"config error at model.name: {name!r} has no local copy. Looked for a local directory and the "
        "hub cache: "
        + "; ".join(tried)
        + ". Nothing is downloaded at run time: download it first (e.g. `huggingface-cli download "
        f"{name}`, or set HF_HUB_CACHE / HF_HOME to the cache that has it) or give a local directory."
    )


def models_cache() -> Path:
    return Path(os.environ.get("CISPO_CACHE", "~/.cache/cispo")).expanduser() / "models"


def content_key(model_dir: Path) -> str:
    """A digest of what determines a conversion: config.json, the index, and each shard's name, size and
    safetensors header (names, dtypes, shapes, offsets). Tensor values are not read (a 456B model's
    shards would take minutes): a shard rewritten in place with the same header keeps its key."""
    digest = hashlib.sha256()
    for name in ("config.json", INDEX, "cispo_remote_config.json"):
        if (model_dir / name).is_file():
            digest.update(name.encode() + (model_dir / name).read_bytes())
    for name in weight_files(model_dir):
        with open(model_dir / name, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            digest.update(name.encode() + str(os.fstat(handle.fileno()).st_size).encode() + handle.read(size))
    return digest.hexdigest()[:20]


def _whole(model_dir: Path) -> bool:
    """Its config and every weight file there (a link to a source since moved or deleted is not)."""
    try:
        return (model_dir / "config.json").is_file() and all(
            (model_dir / f).is_file() for f in weight_files(model_dir)
        )
    except FileNotFoundError:
        return False


def converted(model_dir: Path, to: str, cache: Path | None = None) -> Path:
    """`model_dir` in the `to` layout, made once under the cache (shards linked where unchanged, so the
    key also names the source's place)."""
    source = str(model_dir.resolve()).encode()
    key = hashlib.sha256(content_key(model_dir).encode() + source).hexdigest()[:20]
    target = (cache or models_cache()) / f"{to}-{key}"
    if _whole(target):
        return target
    if target.exists():  # a stale entry: set it aside whole, then make it again
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return convert(model_dir, target, to, link=True)
    except FileExistsError:  # another process finished the same conversion first
        return target


def learner_dir(name: str, cache: Path | None = None) -> Path:
    """The directory the learner loads for `model.name`: a remote-code MiniMax checkpoint converted to
    transformers' native layout; any other model as it is."""
    model_dir = resolve_model_dir(name)
    if layout_of(read_config(model_dir)) != "remote":
        return model_dir
    try:
        return converted(model_dir, "native", cache)
    except ValueError as err:  # a remote config with no native equivalent: still a config error
        raise ValueError(f"config error at model.name: {err}") from err


def engine_dir(model_dir: Path | str, cache: Path | None = None) -> Path:
    """The directory a vLLM engine loads: a MiniMax checkpoint of either layout in the layout vLLM 0.23
    loads (no derived buffers, its RoPE width where vLLM reads it); any other model as it is."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or layout_of(read_config(model_dir)) is None:
        return model_dir  # not a MiniMax checkpoint (or not a directory here): vLLM gets it as it is
    return converted(model_dir, "vllm", cache)


def check_native_rope(config: Any) -> None:
    """Makes transformers' MiniMaxForCausalLM honour a config's partial RoPE (the published checkpoints:
    rotary_dim 64 of head_dim 128, `partial_rotary_factor` 0.5 once converted; transformers 5.25 alone
    rotates the whole head), and refuses one whose RoPE the patch does not cover (a rope_type whose init
    ignores the factor): the learner would then train another function than the checkpoint's, and than
    vLLM runs. Takes the config only (it builds the rotary embedding alone), so the driver can ask before
    any rank loads."""
    if getattr(config, "model_type", "") != NATIVE_MODEL_TYPE:
        return
    from cispo.models.minimax_rope import install, rotary_dim

    install()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wanted = rotary_dim(config)
    if wanted >= head_dim:
        return
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxRotaryEmbedding

    rotated = 2 * MiniMaxRotaryEmbedding(config).inv_freq.numel()
    if rotated != wanted:
        rope = getattr(config, "rope_parameters", None) or {}
        raise ValueError(
            f"config error at model.name: {getattr(config, '_name_or_path', '')!r} asks for RoPE on "
            f"{wanted} of {head_dim} head dims (rope_parameters {rope}), but transformers "
            f"{transformers.__version__}'s MiniMaxForCausalLM with rope_type {rope.get('rope_type')!r} "
            f"rotates {rotated}, which cispo's partial-RoPE patch (cispo/models/minimax_rope.py, rope_type "
            "'default') does not cover: the learner would train a different model than the checkpoint "
            "and vLLM run."
        )
