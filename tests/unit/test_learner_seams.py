"""The Learner protocol's seams as the driver uses them, on the torch learner (the DeepSpeed learner's are in
tests/learner/test_deepspeed_stage_settings.py): HF export by `save_hf` with the driver's marker inside the
atomic rename, shards past `shard_bytes`, placement entries, and no weight source of its own."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cispo.driver.checkpoint import read_hf_marker
from cispo.driver.loop import Loop, export_policy
from cispo.learner.hf_export import write_hf
from tests.learner.helpers import make_batch, trained_run_dir


@pytest.fixture()
def trained(tmp_path: Path):
    """policy_init/ and a torch learner one update past it."""
    return trained_run_dir(tmp_path)


def test_export_policy_writes_the_learners_weights_with_the_marker(trained):
    run_dir, learner = trained
    loop = Loop(seed=0)
    loop.step, loop.run_id = 7, "r1"
    export_policy(SimpleNamespace(learner=learner, tracker=SimpleNamespace(run_dir=run_dir)), loop)
    out = run_dir / "hf"
    assert read_hf_marker(out) == {"step": 7, "run_id": "r1"}
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    saved = load_file(str(out / "model.safetensors"))
    state = learner.model.state_dict()
    assert set(saved) <= set(state) and saved
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert sorted(p.name for p in run_dir.iterdir()) == ["hf", "policy_init"]  # no .tmp / .old left
    # Loadable as a Hugging Face model, with the learner's (trained, not initial) weights.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_a_second_export_replaces_the_first_whole(trained):
    run_dir, learner = trained
    learner.save_hf(run_dir / "policy_init", run_dir / "hf", {"cispo_export.json": json.dumps({"step": 1})})
    learner.train_step(make_batch(learner.tok, n=4, seed=1))
    learner.save_hf(run_dir / "policy_init", run_dir / "hf")
    assert read_hf_marker(run_dir / "hf") is None  # the old marker went with the old export
    saved = load_file(str(run_dir / "hf" / "model.safetensors"))
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in saved.items())


def test_weights_past_shard_bytes_are_sharded_with_an_index(tmp_path: Path):
    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text("{}")
    (template / "model.safetensors").write_text("stale weights: never copied")
    state = {"a": torch.ones(4, 4), "b": torch.zeros(8), "c": torch.arange(6.0)}
    state["tied"] = state["a"]  # shares a's storage: written once
    out = write_hf(state, template, tmp_path / "out", shard_bytes=64)
    # a is 64 bytes (a shard by itself), b 32 and c 24 share the second shard.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == 64 + 32 + 24
    assert not (out / "model.safetensors").exists() and (out / "config.json").read_text() == "{}"
    second = load_file(str(out / "model-00002-of-00002.safetensors"))
    assert torch.equal(second["c"], torch.arange(6.0))


def test_the_torch_learner_runs_in_the_driver_and_sends_no_weights_itself(trained):
    _, learner = trained
    assert learner.placement == [{"role": "learner", "rank": 0, "in": "driver", "pid": os.getpid()}]
    assert learner.weight_source() is None
    assert type(learner).ray_ranks is False
