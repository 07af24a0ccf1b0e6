"""The long-trace task of experiment=algorithms_long: prompts and traces by hand, the disjoint buckets, the
reward on hand-made traces, the shipped files against the generator, and the preset."""

import gzip
import json
from pathlib import Path

import pytest

from cispo.driver.longsum import main, prompt_of, rows, target_of, terms_of, write_jsonl
from cispo.driver.scratchpad import bucket
from rewards.base import RewardInput
from rewards.scratchpad import scratchpad_reward
from tests.unit.test_config import composed, to_train_config

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


def test_prompts_and_traces_by_hand():
    assert prompt_of([3, 5, 8, 2, 9]) == "a3b5c8d2e9="
    assert target_of([3, 5, 8, 2, 9]) == "b:3+5=8,c:8+8=16,d:16+2=18,e:18+9=27"
    assert target_of([7, 9]) == "b:7+9=16"
    assert terms_of("a3b5c8d2e9=") == [3, 5, 8, 2, 9]
    with pytest.raises(ValueError):
        target_of([5])
    with pytest.raises(ValueError):
        prompt_of([1] * 27)  # one letter a term


def test_buckets_are_disjoint_and_rows_well_formed():
    sft, rl, held = rows(500, "sft", 0, 2, 18), rows(500, "rl", 0, 16, 18), rows(100, "eval", 0, 16, 18)
    assert all(bucket(terms_of(r["prompt"])) == "sft" for r in sft)
    assert all(bucket(terms_of(r["prompt"])) == "rl" for r in rl)
    assert all(bucket(terms_of(r["prompt"])) == "eval" for r in held)
    prompts = [{r["prompt"] for r in part} for part in (sft, rl, held)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    for row in rl + held:
        terms = terms_of(row["prompt"])
        assert 16 <= len(terms) <= 18 and all(1 <= t <= 9 for t in terms)
        assert row["answer"] == target_of(terms) and json.loads(row["metadata"]) == {"terms": len(terms)}
    assert {bucket(terms_of(r["prompt"])) for r in rows(300, "train", 0, 2, 8)} == {"sft", "rl"}
    assert rows(50, "rl", 0, 16, 18) == rl[:50]  # deterministic
    with pytest.raises(ValueError, match="split must be"):
        rows(1, "test", 0, 2, 8)
    with pytest.raises(ValueError):
        rows(1, "rl", 0, 2, 27)


def test_write_jsonl_puts_the_held_out_rows_last(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl.gz", 20, 5, 0, 16, 18, split="rl")
    lines = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()]
    assert lines[:20] == rows(20, "rl", 0, 16, 18) and lines[20:] == rows(5, "eval", 0, 16, 18)
    again = write_jsonl(tmp_path / "m.jsonl.gz", 20, 5, 0, 16, 18, split="rl")
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "completion, score",
    [
        ("b:3+5=8,c:8+8=16,d:16+2=18,e:18+9=27", 1.0),  # the correct trace
        ("b:3+5=8,c:8+8=15,d:15+2=17,e:17+9=27", 1.0),  # a slip in the trace, the right answer
        ("b:3+5=8,c:8+8=16,d:16+2=18,e:18+9=28", 0.0),  # a wrong final answer
        ("b:3+5=8,c:8+8=16,d:16+2=18", 0.0),  # stopped early: its last sum is not the answer
        ("b:3+5=8,c:8+8=16,d:16+2=18,e:18+9=2", 0.0),  # cut off by the budget mid-answer
        ("b:3+5=8,c:8+8=16,d:16+2=18,e:18+9", 0.0),  # cut off before the last marker
        ("", 0.0),
    ],
)
def test_reward_scores_hand_made_traces(completion, score):
    reference = target_of([3, 5, 8, 2, 9])
    result = scratchpad_reward(RewardInput("a3b5c8d2e9=", completion, reference))
    assert result.score == score


def _read(name: str) -> list[dict]:
    return [json.loads(x) for x in gzip.open(DATA / name, "rt")]


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    """The commands in the module's docstring and the preset's header."""
    main(["--out", str(tmp_path / "sft.jsonl.gz"), "--split", "sft", "--min-terms", "2", "--max-terms", "18",
          "--num-train", "16000", "--num-eval", "0"])  # fmt: skip
    main(["--out", str(tmp_path / "rl.jsonl.gz"), "--split", "rl", "--min-terms", "16", "--max-terms", "18",
          "--num-train", "4000", "--num-eval", "256"])  # fmt: skip
    for name in ("sft", "rl"):
        shipped = DATA / f"longsum_{name}.jsonl.gz"
        assert shipped.read_bytes() == (tmp_path / f"{name}.jsonl.gz").read_bytes()


def test_the_preset_composes_on_the_shipped_files():
    """The warm start never shows a problem RL trains or is judged on; the held-out traces average at
    least 150 tokens (character tokenizer: a token a character, plus end-of-sequence) and fit the budget
    outside DAPO's overlong window (its last fifth)."""
    cfg = to_train_config(composed("experiment=algorithms_long"))
    assert cfg.data.source == "jsonl" and cfg.data.path.endswith("longsum_rl.jsonl.gz")
    assert cfg.model.warmstart.data_path.endswith("longsum_sft.jsonl.gz") and cfg.model.warmstart.seed == 0
    assert cfg.reward.rewards[0].name == "rewards.scratchpad:scratchpad_reward"
    assert cfg.algorithm.group_size == 8 and not cfg.curriculum.enabled
    sft, rl = _read("longsum_sft.jsonl.gz"), _read("longsum_rl.jsonl.gz")
    train, held = rl[: -cfg.data.num_eval], rl[-cfg.data.num_eval :]
    assert all(bucket(terms_of(r["prompt"])) == "sft" for r in sft)
    assert all(bucket(terms_of(r["prompt"])) == "rl" for r in train)
    assert all(bucket(terms_of(r["prompt"])) == "eval" for r in held)
    lengths = [len(r["answer"]) + 1 for r in held]
    assert sum(lengths) / len(lengths) >= 150
    assert max(len(r["answer"]) + 1 for r in rl) <= 0.8 * cfg.rollout.max_new_tokens
