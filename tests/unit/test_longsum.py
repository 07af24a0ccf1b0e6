"""The long-trace task of experiment=algorithms_long: prompts and traces by hand, the disjoint buckets, the
reward on hand-made traces, the shipped files against the generator, and the preset."""

import gzip
import json
from pathlib import Path

import pytest

from cispo.driver.longsum import main, problem_of, prompt_of, rows, target_of, walk, write_jsonl
from cispo.driver.scratchpad import bucket
from rewards.base import RewardInput
from rewards.scratchpad import scratchpad_reward
from tests.unit.test_config import composed, to_train_config

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


def test_prompts_and_traces_by_hand():
    # 13, 21, 34, 55, 89, 144 -> 44 (the hundred dropped), 89 + 44 = 133 -> 33
    assert walk(13, 21, 5) == [34, 55, 89, 44, 33]
    assert prompt_of(13, 21, 4) == "13+21:e="
    assert target_of(13, 21, 4) == "b:13+21=34,c:21+34=55,d:34+55=89,e:55+89=44"
    assert target_of(5, 0, 2) == "b:05+00=05,c:00+05=05"  # two digits always: every step is 11 characters
    assert problem_of("13+21:e=") == (13, 21, 4) and problem_of(prompt_of(7, 93, 16)) == (7, 93, 16)
    with pytest.raises(ValueError):
        walk(13, 21, 0)
    with pytest.raises(ValueError):
        prompt_of(1, 2, 26)  # one letter a step
    with pytest.raises(ValueError):
        target_of(100, 2, 3)


def _pair(row: dict) -> list[int]:
    return list(problem_of(row["prompt"])[:2])


def test_buckets_are_disjoint_and_rows_well_formed():
    sft, rl, held = rows(500, "sft", 0, 2, 16), rows(500, "rl", 0, 14, 16), rows(100, "eval", 0, 14, 16)
    assert all(bucket(_pair(r)) == "sft" for r in sft)
    assert all(bucket(_pair(r)) == "rl" for r in rl)
    assert all(bucket(_pair(r)) == "eval" for r in held)
    # No trace starts where a trace of another set does.
    pairs = [{tuple(_pair(r)) for r in part} for part in (sft, rl, held)]
    assert not pairs[0] & pairs[1] and not pairs[0] & pairs[2] and not pairs[1] & pairs[2]
    for row in rl + held:
        first, second, steps = problem_of(row["prompt"])
        assert 14 <= steps <= 16 and len(row["answer"]) == 11 * steps - 1
        assert row["answer"] == target_of(first, second, steps)
        assert json.loads(row["metadata"]) == {"steps": steps}
    assert {bucket(_pair(r)) for r in rows(300, "train", 0, 2, 8)} == {"sft", "rl"}
    assert rows(50, "rl", 0, 14, 16) == rl[:50]  # deterministic
    with pytest.raises(ValueError, match="split must be"):
        rows(1, "test", 0, 2, 8)
    with pytest.raises(ValueError):
        rows(1, "rl", 0, 2, 26)


def test_write_jsonl_puts_the_held_out_rows_last(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl.gz", 20, 5, 0, 14, 16, split="rl")
    lines = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()]
    assert lines[:20] == rows(20, "rl", 0, 14, 16) and lines[20:] == rows(5, "eval", 0, 14, 16)
    again = write_jsonl(tmp_path / "m.jsonl.gz", 20, 5, 0, 14, 16, split="rl")
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "completion, score",
    [
        ("b:13+21=34,c:21+34=55,d:34+55=89,e:55+89=44", 1.0),  # the correct trace
        ("b:13+21=34,c:21+34=56,d:34+56=89,e:55+89=44", 1.0),  # a slip in the trace, the right answer
        ("b:13+21=34,c:21+34=55,d:34+55=89,e:55+89=144", 0.0),  # the hundred kept
        ("b:13+21=34,c:21+34=55,d:34+55=89", 0.0),  # stopped early: its last number is not the answer
        ("b:13+21=34,c:21+34=55,d:34+55=89,e:55+89=4", 0.0),  # cut off by the budget mid-answer
        ("b:13+21=34,c:21+34=55,d:34+55=89,e:55+89", 0.0),  # cut off before the last marker
        ("", 0.0),
    ],
)
def test_reward_scores_hand_made_traces(completion, score):
    reference = target_of(13, 21, 4)
    result = scratchpad_reward(RewardInput("13+21:e=", completion, reference))
    assert result.score == score


def _read(name: str) -> list[dict]:
    return [json.loads(x) for x in gzip.open(DATA / name, "rt")]


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    """The commands in the module's docstring and the preset's header."""
    main(["--out", str(tmp_path / "sft.jsonl.gz"), "--split", "sft", "--min-terms", "2", "--max-terms", "16",
          "--num-train", "16000", "--num-eval", "0"])  # fmt: skip
    main(["--out", str(tmp_path / "rl.jsonl.gz"), "--split", "rl", "--min-terms", "14", "--max-terms", "16",
          "--num-train", "4000", "--num-eval", "256"])  # fmt: skip
    for name in ("sft", "rl"):
        shipped = DATA / f"longsum_{name}.jsonl.gz"
        assert shipped.read_bytes() == (tmp_path / f"{name}.jsonl.gz").read_bytes()


def test_the_preset_composes_on_the_shipped_files():
    """The warm start never shows a problem RL trains or is judged on; every held-out trace has at least
    150 tokens (character tokenizer: a token a character, plus end-of-sequence) and every trace fits the
    budget outside DAPO's overlong window (its last fifth)."""
    cfg = to_train_config(composed("experiment=algorithms_long"))
    assert cfg.data.source == "jsonl" and cfg.data.path.endswith("longsum_rl.jsonl.gz")
    assert cfg.model.warmstart.data_path.endswith("longsum_sft.jsonl.gz") and cfg.model.warmstart.seed == 0
    assert cfg.reward.rewards[0].name == "rewards.scratchpad:scratchpad_reward"
    assert cfg.algorithm.group_size == 8 and not cfg.curriculum.enabled
    sft, rl = _read("longsum_sft.jsonl.gz"), _read("longsum_rl.jsonl.gz")
    train, held = rl[: -cfg.data.num_eval], rl[-cfg.data.num_eval :]
    assert all(bucket(_pair(r)) == "sft" for r in sft)
    assert all(bucket(_pair(r)) == "rl" for r in train)
    assert all(bucket(_pair(r)) == "eval" for r in held)
    lengths = [len(r["answer"]) + 1 for r in held]
    assert min(lengths) >= 150  # every held-out trace, not only on average
    assert max(len(r["answer"]) + 1 for r in rl) <= 0.8 * cfg.rollout.max_new_tokens
