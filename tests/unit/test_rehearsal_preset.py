"""The dress rehearsal preset (configs/experiment/minimax_m1_rehearsal.yaml) is minimax_m1_512gpu with
only sizes scaled down: composed with Hydra, the two differ in exactly the keys of ALLOWED, each listed in
the preset's header, and `cispo-plan` plans it from a random checkpoint in the published layout."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cispo.core.config import register_configs
from cispo.driver.cli import CONFIG_DIR

register_configs()
PRESET = Path(CONFIG_DIR) / "experiment" / "minimax_m1_rehearsal.yaml"
SCALE = 256  # 40K -> 80K tokens becomes 160 -> 320

# flattened key (fnmatch pattern) -> why the rehearsal may differ there. Nothing else may differ.
ALLOWED = {
    "model.name": "a random remote-code checkpoint written by cispo.models.random_checkpoint",
    "data.prompts_per_step": "size",
    "rollout.engine": "no GPU here: the CPU hf engine instead of vLLM",
    "rollout.num_workers": "size",
    "rollout.num_gpus_per_worker": "no GPU",
    "rollout.num_cpus_per_worker": "size",
    "rollout.threads_per_worker": "size",
    "rollout.max_batch_size": "size",
    "rollout.engine_kwargs.tensor_parallel_size": "vLLM's; one CPU engine",
    "rollout.max_new_tokens": "budget / 256",
    "curriculum.stages.*.budget": "budget / 256",
    "rollout.repetition_stop_tokens": "/ 256",
    "learner.num_ranks": "size",
    "learner.micro_batch_tokens": "/ 256",
    "learner.routing_replay": "the hf engine records routing; vLLM 0.23 cannot",
    "reward.rewards.1.*": "a length penalty: a random model earns no math reward",
    "cluster.num_nodes": "size",
    "cluster.gpus_per_node": "no GPU",
    "cluster.learner_gpus": "no GPU",
    "cluster.rollout_gpus": "no GPU",
    "experiment.name": "its own name",
    "experiment.total_steps": "3 steps",
}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        out: dict[str, object] = {}
        for key, value in items:
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out else {prefix.rstrip("."): node}
    return {prefix.rstrip("."): node}


@pytest.fixture(scope="module")
def both() -> tuple[dict[str, object], dict[str, object]]:
    real = OmegaConf.to_container(composed("experiment=minimax_m1_512gpu"), resolve=True)
    rehearsal = OmegaConf.to_container(composed("experiment=minimax_m1_rehearsal"), resolve=True)
    return flatten(real), flatten(rehearsal)


def test_the_rehearsal_differs_from_the_real_preset_only_in_allowed_keys(both):
    real, rehearsal = both
    differing = {k for k in real.keys() | rehearsal.keys() if real.get(k, "<absent>") != rehearsal.get(k)}
    unexplained = sorted(k for k in differing if not any(fnmatch.fnmatch(k, p) for p in ALLOWED))
    assert not unexplained, {k: (real.get(k, "<absent>"), rehearsal.get(k, "<absent>")) for k in unexplained}
    unused = [p for p in ALLOWED if not any(fnmatch.fnmatch(k, p) for k in differing)]
    assert not unused, f"ALLOWED names keys that do not differ: {unused}"


def test_the_scaled_numbers_are_the_real_ones_over_256(both):
    real, rehearsal = both
    stages = sorted(k for k in real if fnmatch.fnmatch(k, "curriculum.stages.*.budget"))
    assert len(stages) == 6
    for key in (*stages, "rollout.max_new_tokens", "learner.micro_batch_tokens"):
        assert rehearsal[key] * SCALE == real[key], key
    stop = "rollout.repetition_stop_tokens"
    assert rehearsal[stop] == round(real[stop] / SCALE)
    # what the rehearsal exists to exercise stays as the real preset has it
    kept = ["learner.zero_stage", "learner.offload_optimizer", "learner.gradient_checkpointing",
            "learner.zero_init", "curriculum.enabled", "model.dtype", "algorithm.group_size",
            "algorithm.updates_per_batch", "cluster.ray_address", "cluster.placement_strategy"]  # fmt: skip
    for key in kept:
        assert rehearsal[key] == real[key], key
    assert (real["learner.zero_stage"], real["learner.offload_optimizer"]) == (3, True)


def test_every_allowed_difference_is_listed_in_the_preset_header():
    header = "".join(line for line in PRESET.read_text().splitlines(keepends=True) if line.startswith("#"))
    for pattern in ALLOWED:  # its most specific name: "budget", "rewards", "tensor_parallel_size", ...
        name = [part for part in pattern.split(".") if part != "*" and not part.isdigit()][-1]
        assert name in header, pattern


def test_cispo_plan_plans_the_rehearsal_from_a_published_layout_checkpoint(tmp_path, capsys):
    from cispo.driver.plan import main
    from cispo.models.random_checkpoint import write_random_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "minimax_m1_tiny")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["MiniMaxText01ForCausalLM"] and "layer_types" not in config
    assert config["attn_type_list"] == [0] * 7 + [1] and (config["rotary_dim"], config["head_dim"]) == (8, 16)
    assert len(list(checkpoint.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    assert (checkpoint / "model.safetensors.index.json").is_file()
    main(["experiment=minimax_m1_rehearsal", f"model.name={checkpoint}"])
    out = capsys.readouterr().out
    assert "8 layers (7 lightning, 1 softmax), 4 experts top-2" in out
    assert "2 deepspeed process(es), ZeRO-3" in out and "1 hf engines" in out
    budgets = [int(line.split()[1]) for line in out.splitlines() if re.match(r"\s+\d\s+\d+\s", line)]
    assert budgets == [160, 192, 224, 256, 288, 320]
    assert out.rstrip().endswith("fits")
