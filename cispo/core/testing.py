"""Tiny random-init transformers language models for tests, benchmarks and plugin authors' own checks.

One builder, `tiny_lm(family, seed, **overrides)`, instead of a hand-written config per test file: the
families cover the architectures cispo must handle (dense Qwen2 / Llama, the hybrid MiniMax MoE with
lightning and softmax attention, and Qwen3-MoE), each with small defaults that run in milliseconds on a
CPU. Overrides use transformers' own config field names. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

_SMALL_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}

# family -> (config class, model class, defaults); classes by name so importing this module stays cheap.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 512, **_SMALL_ATTENTION},
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "max_position_embeddings": 64, **_SMALL_ATTENTION},
    ),
    # Hybrid MiniMax: lightning (linear) and softmax attention layers alternate, 4 experts top-2.
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
         "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 16,
         "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
         "max_position_embeddings": 512, **_SMALL_ATTENTION},
    ),
    # About 11M parameters at these defaults: the rollout benchmark's "tiny MoE".
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
         "num_hidden_layers": 4, "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2,
         "max_position_embeddings": 1024, **_SMALL_ATTENTION},
    ),
}  # fmt: skip


def tiny_lm(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-init causal LM of `family` (see FAMILIES); the same arguments give the same weights."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
    config_name, model_name, defaults = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**defaults, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)
