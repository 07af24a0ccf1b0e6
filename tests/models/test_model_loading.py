"""model.name as a local directory or hub-cache entry of either MiniMax layout: resolved offline, the
remote-code layout converted on load (once, cached by contents), and a clear error when nothing is local."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cispo.core.config import ModelConfig
from cispo.driver.policy import link_pretrained, load_policy
from cispo.models.convert import BUFFER_SHARD
from cispo.models.loading import ModelNotFound, engine_dir, learner_dir, resolve_model_dir
from tests.models.minimax_fixture import HEAD_DIM, REMOTE_CONFIG_JSON, tensors_of, write_remote_checkpoint

HUB_ID = "MiniMaxAI/MiniMax-Text-01"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache as the only one: HF_HUB_CACHE set, HF_HOME and the home cache elsewhere."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("CISPO_CACHE", str(tmp_path / "cispo"))
    return cache


def put_in_hub(cache: Path, revision: str = "a59aa9cbc53b9fb8742ca4e9e1531b9802b6fdc3") -> Path:
    repo = cache / "models--MiniMaxAI--MiniMax-Text-01"
    write_remote_checkpoint(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_a_hub_id_with_no_local_copy_names_what_is_missing_and_where_it_looked(hub, tmp_path):
    with pytest.raises(ModelNotFound) as raised:
        resolve_model_dir(HUB_ID)
    message = str(raised.value)
    assert message.startswith(f"config error at model.name: {HUB_ID!r} has no local copy")
    for cache in (hub, tmp_path / "hf_home" / "hub", tmp_path / "xdg" / "huggingface" / "hub"):
        assert f"{cache}/models--MiniMaxAI--MiniMax-Text-01/snapshots/<revision>/config.json" in message
    assert "Nothing is downloaded" in message
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model_dir(str(tmp_path))  # a directory, but not a model
    with pytest.raises(ModelNotFound, match="no local copy"):
        load_policy(HUB_ID, ModelConfig(name=HUB_ID))  # the learner's loader says the same


def test_a_hub_id_resolves_to_the_snapshot_refs_main_names(hub):
    snapshot = put_in_hub(hub)
    newer = hub / "models--MiniMaxAI--MiniMax-Text-01" / "snapshots" / "0000other"
    newer.mkdir()
    (newer / "config.json").write_text("{}")
    assert resolve_model_dir(HUB_ID) == snapshot


def test_a_remote_code_model_name_is_converted_on_load_once_and_keyed_by_contents(hub, tmp_path):
    from transformers import MiniMaxForCausalLM

    snapshot = put_in_hub(hub)
    native = learner_dir(HUB_ID)
    assert native.parent == tmp_path / "cispo" / "models" and native.name.startswith("native-")
    assert json.loads((native / "config.json").read_text())["architectures"] == ["MiniMaxForCausalLM"]
    assert learner_dir(HUB_ID) == native  # cached, not converted again
    _, info = MiniMaxForCausalLM.from_pretrained(native, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = load_policy(HUB_ID, ModelConfig(name=HUB_ID))  # the learner's own loader
    assert type(model).__name__ == "MiniMaxForCausalLM" and model.config.full_attn_alpha_factor > 3.5
    # other contents, another key
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "layernorm_mlp_beta": 0.5}))
    assert learner_dir(HUB_ID) != native


def test_policy_init_from_a_remote_code_checkpoint_feeds_both_sides(hub, tmp_path):
    """policy_init gets the native layout (learner); the vLLM engine gets the published layout back,
    tensor for tensor and config byte for byte, its remote code alongside."""
    snapshot = put_in_hub(hub)
    policy_init = tmp_path / "run" / "policy_init"
    link_pretrained(Path(HUB_ID), policy_init)
    assert json.loads((policy_init / "config.json").read_text())["model_type"] == "minimax"
    engine = engine_dir(policy_init)
    assert (engine / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()
    assert (engine / "modeling_minimax_text_01.py").is_file()
    original, served = tensors_of(snapshot), tensors_of(engine)
    assert sorted(original) == sorted(served)
    assert all(torch.equal(original[n], served[n]) for n in original)


def test_a_conversion_is_keyed_by_place_and_a_broken_cache_entry_is_made_again(tmp_path):
    first = write_remote_checkpoint(tmp_path / "a" / "remote")
    native = learner_dir(str(first), cache=tmp_path / "cache")
    # same contents elsewhere: its own entry, since the entry links the source's shards
    second = write_remote_checkpoint(tmp_path / "b" / "remote")
    assert learner_dir(str(second), cache=tmp_path / "cache") != native
    shutil.rmtree(tmp_path / "b")
    (native / BUFFER_SHARD).unlink()  # a damaged entry (or one whose links dangle)
    again = learner_dir(str(first), cache=tmp_path / "cache")
    assert again == native and (again / BUFFER_SHARD).is_file()
    assert tensors_of(again).keys() > tensors_of(first).keys()


def test_a_native_model_name_is_used_as_it_is(tmp_path):
    from cispo.core.testing import tiny_lm

    tiny_lm("minimax").save_pretrained(tmp_path / "native")
    assert learner_dir(str(tmp_path / "native")) == tmp_path / "native"


def test_partial_rope_of_the_published_checkpoints_is_honoured_not_refused(tmp_path, monkeypatch):
    """The published checkpoints rotate rotary_dim 64 of head_dim 128; transformers' MiniMaxForCausalLM
    (5.25) alone rotates the whole head, so cispo patches it (cispo/models/minimax_rope.py, tested in
    test_minimax_rope.py): both the driver's check and each rank's load accept it and rotate half."""
    monkeypatch.setenv("CISPO_CACHE", str(tmp_path / "cispo"))
    remote = write_remote_checkpoint(tmp_path / "remote")
    config = {**REMOTE_CONFIG_JSON, "rotary_dim": HEAD_DIM // 2}
    (remote / "config.json").write_text(json.dumps(config))
    link_pretrained(remote, tmp_path / "policy_init")
    model = load_policy(str(remote), ModelConfig(name=str(remote)))
    assert 2 * model.model.rotary_emb.inv_freq.numel() == HEAD_DIM // 2
