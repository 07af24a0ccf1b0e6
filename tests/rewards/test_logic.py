from __future__ import annotations

import pytest

from rewards import RewardInput, get_reward
from rewards.logic import extract_answer, reasoning_gym_rows

DATASETS = [
    "basic_arithmetic",
    "letter_counting",
    "word_sorting",
    "prime_factorization",
    "family_relationships",
]


@pytest.mark.parametrize("dataset", DATASETS)
def test_correct_and_wrong_answers(dataset: str) -> None:
    logic = get_reward("logic")
    for row in reasoning_gym_rows(dataset, size=3, seed=1):
        entry = row["metadata"]["reasoning_gym"]["entry"]
        good = RewardInput(row["prompt"], f"thinking...\n<answer>{entry['answer']}</answer>", **_ref(row))
        bad = RewardInput(row["prompt"], "<answer>certainly not this</answer>", **_ref(row))
        assert logic(good).score == 1.0, (dataset, entry)
        assert logic(bad).score < 1.0


def _ref(row: dict) -> dict:
    return {"reference": row["reference"], "metadata": row["metadata"]}


def test_reference_can_be_the_entry_and_dataset_selectable_by_config() -> None:
    row = reasoning_gym_rows("basic_arithmetic", size=1, seed=3)[0]
    entry = row["metadata"]["reasoning_gym"]["entry"]
    assert get_reward("logic")(RewardInput("q", entry["answer"], reference=entry)).score == 1.0
    by_config = get_reward("logic", dataset="basic_arithmetic")
    assert by_config(RewardInput("q", f"\\boxed{{{entry['answer']}}}", reference=entry)).score == 1.0


def test_a_scorer_that_raises_gives_zero_with_reason() -> None:
    # prime_factorization's own scorer raises ValueError on this answer (checked on reasoning-gym 0.1.25)
    row = reasoning_gym_rows("prime_factorization", size=1, seed=0)[0]
    r = get_reward("logic")(RewardInput(row["prompt"], "<answer>{[(</answer>", **_ref(row)))
    assert r.score == 0.0 and "scorer raised" in r.reason


def test_missing_entry_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no reasoning-gym entry"):
        get_reward("logic")(RewardInput("q", "42"))
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'no_such_set'"):
        get_reward("logic", dataset="no_such_set")(RewardInput("q", "42", reference={"answer": "1"}))


def test_extract_answer_forms() -> None:
    assert extract_answer("reasoning\n<answer> 7 </answer>") == "7"
    assert extract_answer("  just this  ") == "just this"
    assert extract_answer("line one\nline two\n\nfinal line\n") == "final line"
