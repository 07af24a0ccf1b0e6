"""The scratchpad task of experiment=tiny_curriculum: rows, targets and held-out split by hand, the reward
that reads only the answer after the marker, the shipped data file and the preset."""

import gzip
import json
from pathlib import Path

import pytest

from cispo.driver.scratchpad import (
    bucket,
    is_held_out,
    main,
    partial_sums,
    prompt_of,
    rows,
    target_of,
    write_jsonl,
)
from rewards.base import RewardInput
from rewards.scratchpad import final_answer, scratchpad_reward
from tests.unit.test_config import composed, to_train_config

REPO = Path(__file__).resolve().parents[2]


def test_targets_by_hand():
    assert partial_sums([3, 5, 8, 2]) == [3, 8, 16, 18]
    assert prompt_of([3, 5, 8, 2, 9]) == "3+5+8+2+9="
    assert target_of([3, 5, 8, 2, 9]) == "8,16,18=27"
    assert target_of([4, 6, 1]) == "10=11"
    assert target_of([7, 9]) == "=16"  # two terms: no running sum, just the answer
    with pytest.raises(ValueError):
        target_of([5])


def test_rows_are_well_formed_and_the_splits_disjoint():
    train, held = rows(400, "train", 0, 2, 12), rows(60, "eval", 0, 2, 12)
    for row in train + held:
        terms = [int(t) for t in row["prompt"][:-1].split("+")]
        assert 2 <= len(terms) <= 12 and all(1 <= t <= 9 for t in terms)
        assert row["answer"] == target_of(terms)
        assert json.loads(row["metadata"]) == {"terms": len(terms)}
    assert not any(is_held_out([int(t) for t in r["prompt"][:-1].split("+")]) for r in train)
    assert all(is_held_out([int(t) for t in r["prompt"][:-1].split("+")]) for r in held)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in rows(2000, "train", 0, 2, 12)}
    assert rows(50, "train", 0, 2, 12) == train[:50]  # deterministic
    with pytest.raises(ValueError):
        rows(1, "train", 0, 1, 4)


def test_write_jsonl_puts_the_held_out_rows_last(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl.gz", 30, 7, 0, 2, 5)
    lines = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()]
    assert len(lines) == 37
    assert lines[-7:] == rows(7, "eval", 0, 2, 5) and lines[:30] == rows(30, "train", 0, 2, 5)
    assert write_jsonl(tmp_path / "t.jsonl.gz", 30, 7, 0, 2, 5).read_bytes() == path.read_bytes()


def test_shipped_file_is_what_the_generator_writes(tmp_path):
    main(["--out", str(tmp_path / "s.jsonl.gz"), "--max-terms", "12"])
    shipped = REPO / "configs" / "data" / "scratchpad_sums.jsonl.gz"
    assert gzip.decompress(shipped.read_bytes()) == gzip.decompress((tmp_path / "s.jsonl.gz").read_bytes())


@pytest.mark.parametrize(
    "completion, score",
    [
        ("8,16,18=27", 1.0),  # the target itself
        ("9,15,18=27", 1.0),  # a wrong scratchpad, the right answer: only the answer counts
        ("8,16,18=28", 0.0),
        ("8,16,18= 27 ", 1.0),  # stripped
        ("8,16,18", 0.0),  # cut off before the marker
        ("8,16,18=", 0.0),  # cut off after it
        ("=2=27", 1.0),  # the last marker counts
        ("27", 0.0),  # no marker
    ],
)
def test_reward_reads_only_the_final_answer(completion, score):
    result = scratchpad_reward(RewardInput("3+5+8+2+9=", completion, "8,16,18=27"))
    assert result.score == score
    assert (result.reason == "") == (score == 1.0)


def test_reward_reference_forms():
    assert scratchpad_reward(RewardInput("7+9=", "=16", "16")).score == 1.0  # a bare answer as reference
    assert scratchpad_reward(RewardInput("1+2+3=", "3;6", "3=6", {}), marker=";").score == 0.0
    assert scratchpad_reward(RewardInput("1+2+3=", "3;6", "3;6"), marker=";").score == 1.0
    assert final_answer("a=b=c") == "c" and final_answer("abc") is None
    with pytest.raises(ValueError):
        scratchpad_reward(RewardInput("1+2=", "=3", None))


def test_preset_composes_with_four_stages():
    cfg = to_train_config(composed("experiment=tiny_curriculum"))
    assert [s.budget for s in cfg.curriculum.stages] == [16, 24, 32, 48] and cfg.curriculum.enabled
    assert cfg.curriculum.length_condition and cfg.curriculum.perplexity_condition
    assert cfg.data.source == "jsonl" and (REPO / cfg.data.path).is_file()
    assert cfg.reward.rewards[0].name == "rewards.scratchpad:scratchpad_reward"


def _terms(prompt: str) -> list[int]:
    return [int(t) for t in prompt[:-1].split("+")]


def test_sft_rl_and_eval_buckets_are_disjoint_and_cover_train():
    sft, rl, held = rows(600, "sft", 0, 2, 8), rows(600, "rl", 0, 2, 8), rows(100, "eval", 0, 2, 8)
    assert all(bucket(_terms(r["prompt"])) == "sft" for r in sft)
    assert all(bucket(_terms(r["prompt"])) == "rl" for r in rl)
    assert not {r["prompt"] for r in sft} & ({r["prompt"] for r in rl} | {r["prompt"] for r in held})
    # "train" is sft and rl together: both parts occur among its rows, the held-out part never.
    seen = {bucket(_terms(r["prompt"])) for r in rows(300, "train", 0, 2, 8)}
    assert seen == {"sft", "rl"}
    with pytest.raises(ValueError, match="split must be"):
        rows(1, "test", 0, 2, 8)


def test_the_algorithms_benchmark_data_files():
    """The shipped files of experiment=algorithms_bench: the warm start never shows a problem that RL
    trains or is judged on, RL's problems have 6-8 terms, and the trace is >= 16 tokens on average."""

    def read(name: str) -> list[dict]:
        return [json.loads(x) for x in gzip.open(REPO / "configs" / "data" / name, "rt")]

    sft, rl = read("scratchpad_sft.jsonl.gz"), read("scratchpad_rl.jsonl.gz")
    train, held = rl[:-256], rl[-256:]
    assert all(bucket(_terms(r["prompt"])) == "sft" and 2 <= len(_terms(r["prompt"])) <= 8 for r in sft)
    assert all(bucket(_terms(r["prompt"])) == "rl" for r in train)
    assert all(bucket(_terms(r["prompt"])) == "eval" for r in held)
    assert all(6 <= len(_terms(r["prompt"])) <= 8 for r in rl)
    assert all(r["answer"] == target_of(_terms(r["prompt"])) for r in sft[:500] + rl[:500])
    # Character tokenizer: one token a character, plus the end-of-sequence token.
    assert sum(len(r["answer"]) + 1 for r in held) / len(held) >= 16
    cfg = to_train_config(composed("experiment=algorithms_bench"))
    assert cfg.model.warmstart.data_path.endswith("scratchpad_sft.jsonl.gz")
    assert cfg.data.path.endswith("scratchpad_rl.jsonl.gz") and cfg.data.num_eval == 256
    assert cfg.model.warmstart.seed == 0 and cfg.rollout.max_new_tokens >= 22


def test_shipped_data_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    from cispo.driver.data import resolve_data_file

    monkeypatch.chdir(tmp_path)
    found = resolve_data_file("configs/data/scratchpad_rl.jsonl.gz", "data.path")
    assert found.samefile(REPO / "configs" / "data" / "scratchpad_rl.jsonl.gz")
    (tmp_path / "configs" / "data").mkdir(parents=True)
    own = tmp_path / "configs" / "data" / "scratchpad_rl.jsonl.gz"
    own.write_bytes(b"x")
    assert resolve_data_file("configs/data/scratchpad_rl.jsonl.gz", "data.path") == own.relative_to(tmp_path)
    with pytest.raises(ValueError, match=r"data.path: no file 'configs/data/nope.jsonl' \(working directory"):
        resolve_data_file("configs/data/nope.jsonl", "data.path")
