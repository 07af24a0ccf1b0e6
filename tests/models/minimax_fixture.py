"""A random MiniMax-Text-01 checkpoint in the published remote-code layout, written independently of the
converter: the config keys of MiniMaxAI/MiniMax-Text-01's config.json and the tensor names of its
model.safetensors.index.json (per-expert w1/w2/w3, no lightning buffers), at a reduced size, bf16."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
LAYERS = [0, 0, 1, 0, 1]  # attn_type_list: 0 lightning, 1 softmax (Text-01: softmax every 8th of 80)
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, FFN, VOCAB = 32, 4, 2, 8, 3, 24, 50

# The published MiniMax-Text-01 config.json's keys (MiniMaxAI/MiniMax-Text-01), at a reduced size.
REMOTE_CONFIG_JSON = {
    "architectures": ["MiniMaxText01ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config",
        "AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM",
    },
    "model_type": "minimax_text_01",
    "attn_type_list": LAYERS, "num_hidden_layers": len(LAYERS), "hidden_size": HIDDEN,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "intermediate_size": FFN, "num_local_experts": EXPERTS, "num_experts_per_tok": 2, "vocab_size": VOCAB,
    "block_size": 4, "postnorm": True, "rope_theta": 10000000, "rotary_dim": HEAD_DIM,
    "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0,
    "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": None, "torch_dtype": "bfloat16",
}  # fmt: skip


def remote_names_and_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the published layout (names as in MiniMax-Text-01's model.safetensors.index.json)."""
    inner = HEADS * HEAD_DIM
    names: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }  # fmt: skip
    for i, kind in enumerate(LAYERS):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (HIDDEN,)
        names[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        names[p + "block_sparse_moe.gate.weight"] = (EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            names[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (FFN, HIDDEN)
            names[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (FFN, HIDDEN)
            names[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (HIDDEN, FFN)
        if kind == 0:
            names[p + "self_attn.qkv_proj.weight"] = (3 * inner, HIDDEN)
            names[p + "self_attn.output_gate.weight"] = (inner, HIDDEN)
            names[p + "self_attn.out_proj.weight"] = (HIDDEN, inner)
            names[p + "self_attn.norm.weight"] = (inner,)
        else:
            names[p + "self_attn.q_proj.weight"] = (inner, HIDDEN)
            names[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
            names[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
            names[p + "self_attn.o_proj.weight"] = (HIDDEN, inner)
    return names


def write_remote_checkpoint(path: Path, shards: int = 3) -> Path:
    """A random remote-code checkpoint in `shards` safetensors files with an index, bf16 like the release."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    names = sorted(remote_names_and_shapes().items())
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: torch.randn(shape, generator=gen).to(torch.bfloat16) for n, shape in names[s::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(REMOTE_CONFIG_JSON, indent=2))
    for module in ("configuration_minimax_text_01.py", "modeling_minimax_text_01.py"):
        (path / module).write_text("# the published remote code (not run here)\n")
    return path


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out
