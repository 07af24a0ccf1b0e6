"""Failures that used to be silent or buried (issue #27 item 4, #22 items 3b and 6): non-finite config
values, keys another backend reads, Hydra's exit code, data files that do not parse, prompts longer than
the model's context, zero reward variance for many steps, a full disk."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from cispo.core.config import TrainConfig
from cispo.driver.update import ZeroVarianceGuard, ZeroVarianceStop
from tests.unit.test_config import composed, to_train_config


def float_keys(schema: type = TrainConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(key, how to set it to a value) for every float or float-tuple field of the schema."""
    keys = []
    for item in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[item.name]
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(kind):
            keys += float_keys(kind, f"{key}.")
        elif kind in (float, float | None):
            keys.append((key, "{}"))
        elif typing.get_origin(kind) is tuple and float in typing.get_args(kind):
            keys.append((f"{key}[1]", "[0.5,{}]"))
    return keys


FLOAT_KEYS = float_keys()


def test_the_schema_walk_finds_the_float_keys():
    names = [key for key, _ in FLOAT_KEYS]
    assert len(names) >= 25
    for key in ("learner.lr", "learner.weight_decay", "rollout.temperature", "model.warmstart.lr"):
        assert key in names
    assert "learner.betas[1]" in names


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize(("key", "template"), FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_every_float_key_refuses_non_finite_values_naming_it(key: str, template: str, value: str):
    override = f"{key.removesuffix('[1]')}={template.format(value)}"
    with pytest.raises(ValueError, match=re.escape(f"config error at {key}: must be a finite number")):
        to_train_config(composed(override))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.loss_kwargs.eps_high=inf", "algorithm.loss_kwargs.eps_high"),
        ("algorithm.loss_kwargs.eps_low=nan", "algorithm.loss_kwargs.eps_low"),
        ("+algorithm.advantage_kwargs.eps=inf", "algorithm.advantage_kwargs.eps"),
        ("reward.rewards=[{name: exact_match, weight: inf}]", r"reward.rewards\[0\].weight"),
        ("reward.rewards=[{name: exact_match, kwargs: {scale: nan}}]", r"reward.rewards\[0\].kwargs.scale"),
        ("curriculum.stages=[{budget: 8, lr: inf}]", r"curriculum.stages\[0\].lr"),
        (
            "curriculum.stages=[{budget: 8, loss_kwargs: {eps_high: inf}}]",
            r"curriculum.stages\[0\].loss_kwargs.eps_high",
        ),
    ],
)
def test_free_form_numbers_are_checked_too(override: str, key: str):
    with pytest.raises(ValueError, match=rf"config error at {key}: must be a finite number"):
        to_train_config(composed(override))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["learner.zero_stage=3"], "learner.zero_stage"),
        (["learner.offload_optimizer=true"], "learner.offload_optimizer"),
        (["learner.num_ranks=4"], "learner.num_ranks"),
        (["rollout.backend=local", "rollout.num_workers=2"], "rollout.num_workers"),
        (["rollout.backend=local", "rollout.worker_timeout_s=60"], "rollout.worker_timeout_s"),
    ],
)
def test_keys_another_backend_reads_are_refused_naming_the_key(overrides: list[str], key: str):
    with pytest.raises(ValueError, match=rf"config error at {key}: only a .* backend reads it"):
        to_train_config(composed(*overrides))
    to_train_config(composed("learner=deepspeed", "learner.zero_stage=3"))  # its own backend: fine


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cispo.driver.cli", f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override",
    ["model.bogus=1", "rollout.num_workers=many", "algorithm=nope", "learner.lr=inf", "learner.zero_stage=3"],
)
def test_every_config_error_exits_2(tmp_path: Path, override: str):
    out = _cli(tmp_path, override)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr


def jsonl_cfg(path: Path, *extra: str) -> TrainConfig:
    return to_train_config(composed("data.source=jsonl", f"data.path={path}", "data.num_eval=0", *extra))


GOOD = '{"prompt": "1+1=", "answer": "2"}\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"prompt": "1+1=", "answer": \n', r"line 3: not valid JSON \(Expecting value at column 30\)"),
        (b'{"prompt": "caf\xe9", "answer": "x"}\n', r"line 3: not UTF-8 \(byte 0xe9 at column 16\)"),
        (b'["a", "b"]\n', "line 3: a JSON object per line, got a list"),
        (b'{"prompt": "2+2="}\n', "line 3 has no usable 'answer' field"),
        (b'{"prompt": 7, "answer": "7"}\n', "line 3: field 'prompt' is a number, but line 1 has a string"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_a_bad_data_line_names_the_file_and_its_1_based_line(
    tmp_path: Path, line: bytes, message: str, compressed: bool
):
    from cispo.driver.data import load_splits

    content = GOOD.encode() + b"\n" + line + GOOD.encode() * 8  # a blank line 2 still counts
    path = tmp_path / ("rows.jsonl.gz" if compressed else "rows.jsonl")
    path.write_bytes(gzip.compress(content) if compressed else content)
    with pytest.raises(ValueError, match=rf"^config error at data.path: '{path}'.* {message}") as err:
        load_splits(jsonl_cfg(path).data)
    assert "\n" not in str(err.value)


def test_the_cli_reports_a_bad_line_in_one_line(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD * 3 + "{oops\n" + GOOD * 3)
    out = _cli(tmp_path / "run", "data.source=jsonl", f"data.path={path}", "logging.wandb=disabled")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"cispo-train: config error at data.path: '{path}' line 4: not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2)"
    ]


def test_a_prompt_longer_than_the_context_is_refused_naming_its_line(tmp_path: Path):
    from cispo.driver.build import check_prompts, load_tokenizer
    from cispo.driver.data import load_splits

    path = tmp_path / "rows.jsonl"
    long = json.dumps({"prompt": "1" * 60 + "+1=", "answer": "x"})
    path.write_text(GOOD * 4 + long + "\n" + GOOD * 4)
    # The tiny model's context is 64 positions here: 63 characters + a budget of 8 do not fit.
    arch = ["+model.arch.max_position_embeddings=64", "rollout.max_new_tokens=8"]
    cfg = jsonl_cfg(path, *arch)
    tokenizer = load_tokenizer(cfg.model.tokenizer_spec())
    splits = load_splits(cfg.data)
    with pytest.raises(
        ValueError, match=r"line 5: the prompt is 63 tokens, more than the 56 that the model's"
    ):
        check_prompts(cfg, tokenizer, splits, print)

    said: list[str] = []
    cfg = jsonl_cfg(path, *arch, "data.truncate_prompts=true")
    check_prompts(cfg, tokenizer, splits, said.append)
    assert said == ["data.truncate_prompts: 1 train prompt(s) longer than 56 tokens keep their last tokens"]


def test_truncation_keeps_the_last_tokens():
    from cispo.driver.data import PromptStream

    cfg = to_train_config(composed()).data
    tokenizer = type(
        "Chars", (), {"__call__": lambda self, text, **_: {"input_ids": [ord(c) for c in text]}}
    )()
    rows = [{"prompt": "abcdefgh", "answer": "x", "metadata": "{}"}]
    group = PromptStream(rows, tokenizer, cfg, group_size=2, max_prompt_tokens=3).make_group(0, rows[0])
    assert group.prompt_ids == [ord("f"), ord("g"), ord("h")]


def test_zero_variance_for_n_steps_stops_naming_the_causes():
    guard, warned = ZeroVarianceGuard(3, "stop"), []
    for frac in (1.0, 1.0, 0.5, 1.0, 1.0):  # a step with signal resets the count
        guard.observe(frac, 0.0, warned.append)
    with pytest.raises(ZeroVarianceStop, match=r"3 steps in a row .*max_zero_variance_steps=3.*too hard"):
        guard.observe(1.0, 0.0, warned.append)
    warn = ZeroVarianceGuard(2, "warn")
    for _ in range(4):
        warn.observe(1.0, 1.0, warned.append)
    assert len(warned) == 2 and "mean reward 1..1" in warned[0]
    off = ZeroVarianceGuard(0)
    for _ in range(100):
        off.observe(1.0, 0.0, warned.append)
    assert len(warned) == 2


def test_zero_variance_config_is_checked():
    with pytest.raises(ValueError, match="algorithm.zero_variance_action: stop or warn"):
        to_train_config(composed("algorithm.zero_variance_action=ignore"))


def test_the_stall_timeout_follows_the_budget_and_measured_speed():
    from rollout.stall import StallTimeout

    stall = StallTimeout(initial_s=1800.0, factor=4.0, floor_s=10.0)
    assert stall.for_shard(16, 100)[0] == 1800.0  # nothing measured yet
    stall.observe(new_tokens=400, seconds=2.0)  # 200 tokens/s
    stall.observe(new_tokens=300, seconds=3.0)  # 100 tokens/s: the slowest counts
    seconds, how = stall.for_shard(16, 100)  # 1,600 tokens at 100/s = 16 s, x 4
    assert seconds == 64.0 and "100.0 tokens/s" in how
    assert stall.for_shard(16, 1000)[0] == 640.0  # ten times the budget, ten times the limit
    assert stall.for_shard(1, 10)[0] == 10.0  # the floor
    assert StallTimeout(fixed_s=30.0).for_shard(16, 10**6)[0] == 30.0  # an explicit value wins


def test_the_full_device_is_named(tmp_path: Path):
    import errno

    from cispo.driver.diskspace import disk_full_note, mount_of

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cispo-test-fs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert mount_of(mount / "deeper" / "not-yet") == (str(mount), "cispo-test-fs")
        with pytest.raises(OSError) as err:
            (mount / "big").write_bytes(b"0" * 2_000_000)
        assert err.value.errno == errno.ENOSPC
        note = disk_full_note(mount / "big", err.value)
        assert note.startswith(f"the device is full: {mount} (cispo-test-fs, ")
        assert disk_full_note(mount, PermissionError(errno.EACCES, "no")) == ""
    finally:
        subprocess.run(["umount", str(mount)], check=True)
