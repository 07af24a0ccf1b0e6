"""MiniMax checkpoint layouts: the converter round trip is bit-exact, the native class loads what it
writes with no missing or unexpected keys, and vLLM 0.23's loader maps every name the engine gets.

The remote-code fixture is written the way the published checkpoints are (config keys of MiniMax-Text-01's
config.json, per-expert w1/w2/w3 names, no lightning buffers), with random tensors, independently of the
converter; the vLLM table below is pinned from vllm 0.23.0's minimax_text_01.py (see VLLM_023_PARAMS).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from cispo.core.testing import tiny_lm
from cispo.models.convert import BUFFER_SHARD, INDEX, REMOTE_CONFIG, convert, main
from cispo.models.minimax_layout import config_to_native, config_to_remote
from tests.models.minimax_fixture import (
    FFN,
    HEAD_DIM,
    LAYERS,
    REMOTE_CONFIG_JSON,
    tensors_of,
    write_remote_checkpoint,
)


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_remote_to_native_to_remote_is_bit_exact(tmp_path):
    remote = write_remote_checkpoint(tmp_path / "remote")
    native = convert(remote, tmp_path / "native", "native")
    back = convert(native, tmp_path / "back", "remote")
    assert_bit_exact(tensors_of(remote), tensors_of(back))
    assert (back / "config.json").read_bytes() == (remote / "config.json").read_bytes()
    assert (back / "modeling_minimax_text_01.py").is_file()
    assert sorted(p.name for p in back.glob("*.safetensors")) == sorted(
        p.name for p in remote.glob("*.safetensors")
    )
    # the native side: the same tensors plus the derived buffers of the three lightning layers, indexed
    native_tensors = tensors_of(native)
    buffers = {n for n in native_tensors if n not in tensors_of(remote)}
    assert buffers == {f"model.layers.{i}.self_attn.{b}" for i in (0, 1, 3)
                       for b in ("slope_rate", "query_decay", "key_decay", "diagonal_decay")}  # fmt: skip
    index = json.loads((native / INDEX).read_text())["weight_map"]
    assert set(index) == set(native_tensors) and index["model.layers.0.self_attn.slope_rate"] == BUFFER_SHARD


def test_native_class_loads_converted_checkpoint_with_no_missing_or_unexpected_keys(tmp_path):
    from transformers import MiniMaxForCausalLM

    native = convert(write_remote_checkpoint(tmp_path / "remote"), tmp_path / "native", "native", link=True)
    assert all((native / p.name).is_symlink() for p in (tmp_path / "remote").glob("model-*.safetensors"))
    model, info = MiniMaxForCausalLM.from_pretrained(native, output_loading_info=True, dtype=torch.bfloat16)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert model.config.layer_types == ["linear_attention", "linear_attention", "full_attention",
                                        "linear_attention", "full_attention"]  # fmt: skip
    assert model.config.mlp_alpha_factor == 3.5565588200778455
    remote = tensors_of(tmp_path / "remote")
    state = model.state_dict()
    # transformers fuses experts in memory: [E, 2I, H] = cat(w1, w3) per expert; [E, H, I] = w2
    fused = state["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(fused[1, :FFN], remote["model.layers.2.block_sparse_moe.experts.1.w1.weight"])
    assert torch.equal(fused[1, FFN:], remote["model.layers.2.block_sparse_moe.experts.1.w3.weight"])
    assert torch.equal(
        state["model.layers.0.self_attn.qkv_proj.weight"], remote["model.layers.0.self_attn.qkv_proj.weight"]
    )
    # the derived buffers equal what the class computes for itself
    fresh = MiniMaxForCausalLM(model.config).to(torch.bfloat16)
    for name in ("slope_rate", "diagonal_decay"):
        key = f"model.layers.3.self_attn.{name}"
        assert torch.equal(state[key], fresh.state_dict()[key].to(state[key].dtype)), key


def test_native_to_remote_to_native_is_bit_exact_and_drops_only_the_buffers(tmp_path):
    model = tiny_lm("minimax", seed=3)
    model.save_pretrained(tmp_path / "native")
    remote = convert(tmp_path / "native", tmp_path / "remote", "remote")
    config = json.loads((remote / "config.json").read_text())
    assert config["architectures"] == ["MiniMaxText01ForCausalLM"] and config["attn_type_list"] == [
        0,
        1,
        0,
        1,
    ]
    assert config["rotary_dim"] == 16 and config["postnorm"] is True and "layer_types" not in config
    original = tensors_of(tmp_path / "native")
    assert set(original) - set(tensors_of(remote)) == {
        f"model.layers.{i}.self_attn.{b}" for i in (0, 2)
        for b in ("slope_rate", "query_decay", "key_decay", "diagonal_decay")}  # fmt: skip
    again = convert(remote, tmp_path / "again", "native")
    assert_bit_exact(original, tensors_of(again))


def test_config_maps_are_inverse_and_follow_transformers_migration():
    native = config_to_native(REMOTE_CONFIG_JSON)
    # transformers' own migration (minimax_vl_01 _migrate_legacy_text_config) gives these values
    assert (
        native["layer_types"][2] == "full_attention"
        and native["full_attn_alpha_factor"] == 3.5565588200778455
    )
    assert native["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000000}
    assert not {"attn_type_list", "postnorm", "rotary_dim", "auto_map", "shared_moe_mode"} & set(native)
    partial = config_to_native({**REMOTE_CONFIG_JSON, "rotary_dim": HEAD_DIM // 2})
    assert partial["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config_to_remote(partial)["rotary_dim"] == HEAD_DIM // 2
    back = config_to_remote(native, REMOTE_CONFIG_JSON["auto_map"])
    for key in ("attn_type_list", "layernorm_mlp_alpha", "rotary_dim", "rope_theta", "postnorm", "auto_map"):
        assert back[key] == REMOTE_CONFIG_JSON[key], key


@pytest.mark.parametrize(
    "change, message",
    [({"postnorm": False}, "postnorm false"), ({"shared_intermediate_size": 16}, "shared expert"),
     ({"attn_type_list": [0, 2, 1, 0, 1]}, "attn_type_list"), ({"rotary_dim": 3}, "rotary_dim 3")],
)  # fmt: skip
def test_remote_configs_with_no_native_equivalent_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        config_to_native({**REMOTE_CONFIG_JSON, **change}, "x/config.json")


def test_cli_converts_and_refuses_an_existing_destination(tmp_path, capsys):
    remote = write_remote_checkpoint(tmp_path / "remote")
    assert main([str(remote), str(tmp_path / "out"), "--to", "native"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "minimax"
    assert (tmp_path / "out" / REMOTE_CONFIG).read_bytes() == (remote / "config.json").read_bytes()
    assert main([str(remote), str(tmp_path / "out"), "--to", "native"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.partial-*"))


# vLLM 0.23.0, vllm/model_executor/models/minimax_text_01.py: the parameters of MiniMaxText01ForCausalLM
# (MiniMaxText01LinearAttention: qkv_proj, output_gate, out_proj, norm; MiniMaxText01Attention: qkv_proj,
# o_proj; MiniMaxText01MoE: gate, experts (FusedMoE: w13_weight, w2_weight); input_layernorm,
# post_attention_layernorm; model.embed_tokens, model.norm, lm_head) and how load_weights routes a name.
VLLM_023_PARAMS = {
    0: ("self_attn.qkv_proj.weight", "self_attn.output_gate.weight", "self_attn.out_proj.weight",
        "self_attn.norm.weight"),
    1: ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight"),
    "every": ("input_layernorm.weight", "post_attention_layernorm.weight", "block_sparse_moe.gate.weight",
              "block_sparse_moe.experts.w13_weight", "block_sparse_moe.experts.w2_weight"),
}  # fmt: skip


def vllm_023_params(attn_types: list[int]) -> set[str]:
    params = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i, kind in enumerate(attn_types):
        params |= {f"model.layers.{i}.{p}" for p in (*VLLM_023_PARAMS[kind], *VLLM_023_PARAMS["every"])}
    return params


def vllm_023_route(name: str, attn_types: list[int], params: set[str]) -> str:
    """The parameter vLLM 0.23's MiniMaxText01Model.load_weights loads `name` into (KeyError: none)."""
    layer = re.search(r"layers\.(\d+)\.", name)
    if "norm" in name and name in params:
        return name
    if "self_attn" in name and layer and attn_types[int(layer.group(1))] == 1:
        name = re.sub(r"\.(q|k|v)_proj\.", ".qkv_proj.", name)
    elif "block_sparse_moe" in name:
        name = re.sub(r"experts\.\d+\.(w1|w3)\.weight$", "experts.w13_weight", name)
        name = re.sub(r"experts\.\d+\.w2\.weight$", "experts.w2_weight", name)
    if name not in params:
        raise KeyError(name)
    return name


@pytest.mark.parametrize("source", ["remote", "native"])
def test_every_name_the_vllm_engine_gets_is_one_vllm_023_maps(source, tmp_path):
    from cispo.models.loading import engine_dir

    if source == "remote":
        start = write_remote_checkpoint(tmp_path / "remote")
        attn_types = LAYERS
    else:
        tiny_lm("minimax").save_pretrained(tmp_path / "native")
        start, attn_types = tmp_path / "native", [0, 1, 0, 1]
        with pytest.raises(KeyError, match="slope_rate|_decay"):  # why the engine gets a converted directory
            for name in tensors_of(start):
                vllm_023_route(name, attn_types, vllm_023_params(attn_types))
    engine = engine_dir(start, cache=tmp_path / "cache")
    params = vllm_023_params(attn_types)
    loaded = {vllm_023_route(name, attn_types, params) for name in tensors_of(engine)}
    assert loaded == params
    config = json.loads((engine / "config.json").read_text())
    assert config.get("rotary_dim", None) in (None, HEAD_DIM, 16)
    assert engine_dir(start, cache=tmp_path / "cache") == engine  # made once, keyed by contents


def test_weight_sync_names_are_ones_vllm_023_maps():
    from rollout.vllm_parts import checkpoint_names

    model = tiny_lm("minimax")
    attn_types = [0, 1, 0, 1]
    params = vllm_023_params(attn_types)
    for model_type in ("minimax", "minimax_text_01", "minimax_m1"):
        names = [n for n, _ in checkpoint_names(model.state_dict().items(), model_type=model_type)]
        assert {vllm_023_route(n, attn_types, params) for n in names} == params


def test_cli_says_when_the_remote_code_files_must_be_copied_in(tmp_path, capsys):
    tiny_lm("minimax").save_pretrained(tmp_path / "native")
    assert main([str(tmp_path / "native"), str(tmp_path / "remote"), "--to", "remote"]) == 0
    assert "modeling_minimax_text_01.py" in capsys.readouterr().err
    published = write_remote_checkpoint(tmp_path / "published")
    assert main([str(published), str(tmp_path / "native2"), "--to", "native"]) == 0
    assert main([str(tmp_path / "native2"), str(tmp_path / "back"), "--to", "remote"]) == 0
    assert "note" not in capsys.readouterr().err  # the published files came along


def test_a_bf16_native_checkpoint_keeps_its_own_buffers_and_weights_bits(tmp_path):
    tiny_lm("minimax", seed=5).to(torch.bfloat16).save_pretrained(tmp_path / "native")
    original = tensors_of(tmp_path / "native")
    assert original["model.layers.0.self_attn.slope_rate"].dtype == torch.bfloat16
    same = convert(tmp_path / "native", tmp_path / "same", "native")  # native -> native: nothing recomputed
    assert_bit_exact(original, tensors_of(same))
    # via the remote layout (which has no buffers) the weights keep their bits; the buffers come back
    # recomputed in fp32, equal to the saved ones once rounded to bf16
    again = tensors_of(convert(convert(same, tmp_path / "remote", "remote"), tmp_path / "again", "native"))
    buffers = {k for k in original if k.endswith(("slope_rate", "_decay"))}
    assert_bit_exact({k: v for k, v in original.items() if k not in buffers},
                     {k: v for k, v in again.items() if k not in buffers})  # fmt: skip
    assert all(torch.equal(again[k].to(torch.bfloat16), original[k]) for k in buffers)


def test_an_edited_native_config_is_not_replaced_by_the_stashed_published_one(tmp_path):
    native = convert(write_remote_checkpoint(tmp_path / "remote"), tmp_path / "native", "native")
    config = json.loads((native / "config.json").read_text())
    (native / "config.json").write_text(json.dumps({**config, "mlp_beta_factor": 0.25}))
    back = json.loads((convert(native, tmp_path / "back", "remote") / "config.json").read_text())
    assert back["layernorm_mlp_beta"] == 0.25 and back["auto_map"] == REMOTE_CONFIG_JSON["auto_map"]
