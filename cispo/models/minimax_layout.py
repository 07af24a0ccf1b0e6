"""The two on-disk layouts of MiniMax-Text-01 / MiniMax-M1, and the rules between them (pure: no I/O).

- **remote**: the published checkpoints (MiniMaxAI/MiniMax-Text-01, MiniMax-M1-40k, MiniMax-M1-80k), which
  need their own modelling code: `architectures` `MiniMaxText01ForCausalLM` / `MiniMaxM1ForCausalLM`,
  `model_type` `minimax_text_01` / `minimax_m1`, an `auto_map` to the shipped `.py` files, and the config
  keys `attn_type_list` (0 lightning, 1 softmax), `layernorm_{full_attention,linear_attention,mlp}_{alpha,
  beta}`, `postnorm`, `rope_theta` + `rotary_dim`, `shared_intermediate_size`, `shared_moe_mode`.
- **native**: transformers' `MiniMaxForCausalLM` (`model_type` `minimax`): `layer_types`,
  `{full_attn,linear_attn,mlp}_{alpha,beta}_factor`, `rope_parameters` (with `partial_rotary_factor`).

Weight names are the same in both layouts: `model.embed_tokens`, `model.norm`, `lm_head`, per layer
`input_layernorm`, `post_attention_layernorm`, `block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`
(transformers 5 fuses the experts in memory, `mlp.experts.gate_up_proj` / `down_proj`, and splits them
back on save through its "mixtral" conversion mapping), `self_attn.q_proj/k_proj/v_proj/o_proj` (softmax
layers) and `self_attn.qkv_proj/output_gate/out_proj/norm` (lightning layers). The one difference: a
native checkpoint written by transformers 5 also stores four persistent buffers of every lightning layer,
`self_attn.slope_rate/query_decay/key_decay/diagonal_decay` (functions of the config, not trained), which
the remote layout lacks and transformers reports as missing keys without; vLLM 0.23's `load_weights`
has no parameter of those names (its slope rate is a plain attribute), so they must not reach it.

Sources, read for this module (2026-12-07):
- config key mapping: transformers `src/transformers/models/minimax_vl_01/configuration_minimax_vl_01.py`
  `_migrate_legacy_text_config` (huggingface/transformers @ b0da56775e5f2fcbee7ac33169fe7ec7208524b8), the
  library's own "released remote-code MiniMax-Text-01 schema -> native MiniMax schema" translation,
  including the refusals (postnorm false, a shared expert, attn types other than 0/1, odd rotary_dim) and
  the Text-01 values (80 layers, softmax every 8th, alpha 3.5565588200778455, rope_theta 1e7, partial 0.5);
  remote config class: `src/transformers/models/minimax_text_01/configuration_minimax_text_01.py`
  (@ 33e4157414c829b0a2f94b53d187a749d3b01c5f, the PR #35831 port of the published file).
- native names and buffers: transformers 5.25.0 `models/minimax/modeling_minimax.py` (installed here) and
  `conversion_mapping.py` ("minimax" -> "mixtral": `.block_sparse_moe.` -> `.mlp.`, experts fused).
- vLLM: `vllm/model_executor/models/minimax_text_01.py` of the vllm 0.23.0 sdist on PyPI (the last release
  with it; its registry maps `MiniMaxForCausalLM`, `MiniMaxText01ForCausalLM` and `MiniMaxM1ForCausalLM`
  all to `MiniMaxText01ForCausalLM`). Its loader reads `attn_type_list` (else `layer_types`), the
  `layernorm_*` keys (else the native `*_factor` keys), and `rotary_dim` (else head_dim: a native config's
  `partial_rotary_factor` is overwritten with 1.0). Its `load_weights` routes names by the substrings
  `norm`, `self_attn`, `block_sparse_moe`, `experts.E.w1/w2/w3`, `q_proj/k_proj/v_proj`.
  vLLM's test registry pins MiniMaxAI/MiniMax-Text-01 at revision a59aa9cbc53b9fb8742ca4e9e1531b9802b6fdc3.
"""

from __future__ import annotations

import re
from typing import Any

REMOTE_ARCHITECTURES = ("MiniMaxText01ForCausalLM", "MiniMaxM1ForCausalLM")
REMOTE_MODEL_TYPES = ("minimax_text_01", "minimax_m1")
NATIVE_ARCHITECTURE = "MiniMaxForCausalLM"
NATIVE_MODEL_TYPE = "minimax"
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config",
    "AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM",
}
# remote (published) key -> native (transformers) key; values unchanged.
FACTOR_KEYS = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
REMOTE_ONLY_KEYS = ("attn_type_list", "postnorm", "rotary_dim", "rope_theta", "shared_intermediate_size",
                    "shared_moe_mode", "auto_map", *FACTOR_KEYS)  # fmt: skip
# Persistent buffers of a lightning layer that transformers 5 saves and recomputes from the config.
DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_DERIVED = re.compile(rf"(^|\.)layers\.(\d+)\.self_attn\.({'|'.join(DERIVED_BUFFERS)})$")
_LAYER_TYPES = {0: "linear_attention", 1: "full_attention"}


def layout_of(config: dict[str, Any]) -> str | None:
    """ "remote", "native", or None (not a MiniMax-Text-01 family config)."""
    archs = config.get("architectures") or []
    if config.get("model_type") in REMOTE_MODEL_TYPES or set(archs) & set(REMOTE_ARCHITECTURES):
        return "remote"
    if config.get("model_type") == NATIVE_MODEL_TYPE or NATIVE_ARCHITECTURE in archs:
        return "native"
    return None


def derived_buffer(name: str) -> tuple[int, str] | None:
    """(layer index, buffer) when `name` is one of a lightning layer's derived buffers."""
    match = _DERIVED.search(name)
    return (int(match.group(2)), match.group(3)) if match else None


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _fail(source: str, message: str) -> ValueError:
    return ValueError(f"MiniMax config ({source}): {message}")


def config_to_native(remote: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The native (transformers MiniMaxConfig) config.json of a remote-code config.json."""
    native = {k: v for k, v in remote.items() if k not in REMOTE_ONLY_KEYS}
    if remote.get("postnorm", True) is not True:
        raise _fail(source, "postnorm false (residual taken before the norm) has no native equivalent")
    shared = remote.get("shared_intermediate_size", 0)
    shared_values = shared if isinstance(shared, list) else [shared]
    if any(v != 0 for v in shared_values):
        raise _fail(source, f"shared_intermediate_size {shared}: the shared expert has no native equivalent")
    types = remote.get("attn_type_list")
    if types is not None:
        if any(t not in _LAYER_TYPES for t in types) or len(types) != remote.get(
            "num_hidden_layers", len(types)
        ):
            raise _fail(source, f"attn_type_list {types} needs one 0 or 1 per hidden layer")
        native["layer_types"] = [_LAYER_TYPES[t] for t in types]
    for old, new in FACTOR_KEYS.items():
        if old in remote:
            native[new] = remote[old]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": remote.get("rope_theta", 1_000_000.0)}
    rotary_dim = remote.get("rotary_dim")
    if rotary_dim is not None:
        head_dim = _head_dim(remote)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise _fail(source, f"rotary_dim {rotary_dim} must be even and in (0, head_dim {head_dim}]")
        if rotary_dim != head_dim:
            rope["partial_rotary_factor"] = rotary_dim / head_dim
    native["rope_parameters"] = rope
    native["model_type"] = NATIVE_MODEL_TYPE
    native["architectures"] = [NATIVE_ARCHITECTURE]
    return native


def config_to_remote(native: dict[str, Any], auto_map: dict[str, str] | None = None) -> dict[str, Any]:
    """The remote-code config.json of a native one (MiniMaxText01ForCausalLM, postnorm, no shared expert)."""
    remote = {
        k: v for k, v in native.items() if k not in (*FACTOR_KEYS.values(), "layer_types", "rope_parameters")
    }
    layer_types = native.get("layer_types") or []
    codes = {v: k for k, v in _LAYER_TYPES.items()}
    unknown = sorted({t for t in layer_types if t not in codes})
    if unknown:
        raise ValueError(f"MiniMax config: layer_types {unknown} have no remote-code attn_type_list code")
    remote["attn_type_list"] = [codes[t] for t in layer_types]
    for old, new in FACTOR_KEYS.items():
        remote[old] = native.get(new, 1)
    rope = native.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"MiniMax config: rope_type {rope['rope_type']!r} has no remote-code equivalent")
    remote["rope_theta"] = rope.get("rope_theta", native.get("rope_theta", 1_000_000.0))
    remote["rotary_dim"] = int(round(_head_dim(native) * float(rope.get("partial_rotary_factor", 1.0))))
    remote.update(postnorm=True, shared_intermediate_size=0, model_type=REMOTE_MODEL_TYPES[0])
    remote["architectures"] = [REMOTE_ARCHITECTURES[0]]
    remote["auto_map"] = dict(auto_map or DEFAULT_AUTO_MAP)
    return remote


def config_for_vllm(native: dict[str, Any]) -> dict[str, Any]:
    """A native config as vLLM 0.23 must read it: its MiniMax loader takes the RoPE width from
    `rotary_dim` only (it overwrites `partial_rotary_factor` with rotary_dim / head_dim, 1.0 without it)."""
    out = dict(native)
    rope = native.get("rope_parameters") or {}
    out["rotary_dim"] = int(round(_head_dim(native) * float(rope.get("partial_rotary_factor", 1.0))))
    return out
