"""Start-up checks (cispo.driver.validate): every key real, every registry name and kwarg resolved before a
model is built, and the keys that used to be validated but never read now change what runs."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cispo.core.config import ClusterConfig, TrainConfig
from cispo.driver.build import check_cluster
from tests.unit.test_config import composed, to_train_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+experiment.totl_steps=5"],
            r"experiment\.totl_steps: unknown key; did you mean experiment\.total_steps",
        ),
        (["++model.warmstrat.lr=1"], r"model\.warmstrat: unknown key; did you mean model\.warmstart"),
        (["+zzz=1"], r"zzz: unknown key; the top level has"),
        (["algorithm.loss=ppo"], r"algorithm\.loss: unknown policy loss 'ppo'"),
        (["algorithm.advantage=nope"], r"algorithm\.advantage: unknown advantage estimator 'nope'"),
        (
            ["+algorithm.loss_kwargs.eps=0.2"],
            r"algorithm\.loss_kwargs: cispo_loss takes no argument \['eps'\]",
        ),
        (["+algorithm.loss_kwargs.normalizer=group"], r"loss_kwargs\.normalizer: set by the learner"),
        (["algorithm.loss_kwargs.eps_high=-1"], r"loss_kwargs\.eps_high: must be >= 0"),
        (["algorithm.loss_kwargs.eps_low=1.5"], r"loss_kwargs\.eps_low: must be in \[0, 1\]"),
        (["+algorithm.advantage_kwargs.scale=2"], r"advantage_kwargs: group_advantages takes no argument"),
        (["learner.backend=jax"], r"learner\.backend: unknown learner backend 'jax'"),
        (["learner=deepspeed", "learner.zero_stage=1"], r"learner: learner\.zero_stage must be 2 or 3"),
        (["rollout.engine=sglang"], r"rollout\.engine: unknown rollout engine 'sglang'"),
        (["reward.rewards=[{name: nope}]"], r"reward\.rewards\[0\]: unknown reward 'nope'"),
        (["cluster.num_nodes=2"], r"cluster\.num_nodes: 2 nodes need cluster\.ray_address"),
        (["cluster.weight_sync=broadcast"], r"cluster\.weight_sync: broadcast sends weights from learner"),
        (["cluster.placement_strategy=RANDOM"], r"cluster\.placement_strategy: one of"),
        (
            ["cluster.gpus_per_node=1", "cluster.learner_gpus=1", "cluster.rollout_gpus=1"],
            r"cluster\.learner_gpus: learner_gpus \+ rollout_gpus = 2 exceed the allocation",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        to_train_config(composed(*overrides))


def test_choosing_an_algorithm_replaces_the_loss_kwargs_wholesale():
    # The schema default used to be CISPO's {eps_low, eps_high}, merged into GRPO's {eps}: a crash at the
    # first update. Each algorithm's YAML now gives its kwargs whole.
    assert to_train_config(composed("algorithm=grpo")).algorithm.loss_kwargs == {"eps": 0.2}
    assert to_train_config(composed("algorithm=dapo")).algorithm.loss_kwargs == {
        "eps_low": 0.2,
        "eps_high": 0.28,
    }


def test_a_loss_by_dotted_path_is_checked_like_a_registered_one():
    cfg = to_train_config(composed("algorithm=grpo", "algorithm.loss=cispo.algo.losses:grpo_loss"))
    assert cfg.algorithm.loss == "cispo.algo.losses:grpo_loss"
    with pytest.raises(ValueError, match=r"algorithm\.loss: policy loss 'cispo\.algo\.losses:nope'"):
        to_train_config(composed("algorithm.loss=cispo.algo.losses:nope"))


def test_cli_refuses_a_plus_typo_before_building_anything(tmp_path: Path):
    start = time.monotonic()
    cmd = [sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={tmp_path}", "+experiment.totl_steps=5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config error at experiment.totl_steps: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "policy_init").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert time.monotonic() - start < 120


def test_cluster_keys_are_checked_against_the_ray_cluster():
    cfg = TrainConfig(cluster=ClusterConfig(ray_address="auto", num_nodes=2, gpus_per_node=1))
    one_node = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8, "GPU": 1}}]
    totals = {"CPU": 16.0, "GPU": 2.0}
    with pytest.raises(RuntimeError, match="num_nodes=2 but the Ray cluster at auto has 1 live node"):
        check_cluster(cfg, one_node, totals)
    no_gpu = one_node + [{"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8}}]
    with pytest.raises(
        RuntimeError, match=r"gpus_per_node=1, but these nodes have fewer GPUs: \['10.0.0.2'\]"
    ):
        check_cluster(cfg, no_gpu, totals)
    check_cluster(cfg, one_node + [{**one_node[0], "NodeManagerAddress": "10.0.0.2"}], totals)


def test_the_tokenizer_follows_the_model_unless_set():
    assert to_train_config(composed()).model.tokenizer_spec() == "builtin:char"
    assert to_train_config(composed("model.name=/ckpt/qwen")).model.tokenizer_spec() == "/ckpt/qwen"
    assert to_train_config(composed("experiment=smollm2_gsm")).model.tokenizer_spec() == "smollm2_gguf"
    set_explicitly = composed("model.name=/ckpt/qwen", "model.tokenizer=/tok/other")
    assert to_train_config(set_explicitly).model.tokenizer_spec() == "/tok/other"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "learner.grad_clip=-1",
            r"learner\.grad_clip: must be >= 0 \(0: no clipping\); < 0 flips every update",
        ),
        ("learner.adam_eps=0", r"learner\.adam_eps: must be > 0"),
        ("learner.betas=[0.9,1.0]", r"learner\.betas: each in \[0, 1\)"),
        ("learner.warmup_steps=-1", r"learner\.warmup_steps: must be >= 0"),
        ("learner.num_ranks=0", r"learner\.num_ranks: must be >= 1"),
        ("reward.max_workers=0", r"reward\.max_workers: must be >= 1"),
        ("reward.stop_error_fraction=0", r"reward\.stop_error_fraction: must be in \(0, 1\]"),
        ("rollout.threads_per_worker=0", r"rollout\.threads_per_worker: must be >= 1"),
        ("rollout.repetition_prob=1.0", r"rollout\.repetition_prob: must be in \(0, 1\)"),
        ("rollout.dtype=float16", r"rollout\.dtype: float32 or bfloat16"),
        ("algorithm.dynamic_sampling_rounds=-1", r"algorithm\.dynamic_sampling_rounds: must be >= 0"),
        ("experiment.keep_checkpoints=-1", r"experiment\.keep_checkpoints: must be >= 0"),
        ("curriculum.patience=0", r"curriculum\.patience: must be >= 1"),
        ("logging.log_every=0", r"logging\.log_every: must be >= 1"),
        ("model.warmstart.eval_every=0", r"model\.warmstart\.eval_every: must be >= 1"),
    ],
)
def test_values_that_pass_types_but_do_harm_are_refused(override: str, message: str):
    with pytest.raises(ValueError, match=message):
        to_train_config(composed(override))


@pytest.mark.parametrize(("content", "message"), [("", "is empty"), (None, "no file")])
def test_an_empty_or_missing_dataset_is_a_config_error(tmp_path: Path, content: str | None, message: str):
    from cispo.driver.data import load_splits

    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_text(content)
    cfg = to_train_config(composed("data.source=jsonl", f"data.path={path}"))
    with pytest.raises(ValueError, match=f"config error at data.path: .*{message}"):
        load_splits(cfg.data)


def test_a_dataset_whose_rows_all_go_to_eval_leaves_no_train_rows(tmp_path: Path):
    from cispo.driver.data import load_splits

    cfg = to_train_config(
        composed("data.source=reasoning_gym", "data.generator=basic_arithmetic", "data.num_train=1")
    )
    cfg.data.num_train = 0  # past validation on purpose: the loader is the last line of defence
    with pytest.raises(
        ValueError, match="config error at data: the train split of data.source='reasoning_gym'"
    ):
        load_splits(cfg.data)
