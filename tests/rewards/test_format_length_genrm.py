from __future__ import annotations

import pytest

from rewards import RewardInput, RewardResult, RewardScorer, RewardSpec, get_reward
from rewards.genrm import GenerativeRewardModel, JudgeParseError
from rewards.length import overlong_penalty


@pytest.mark.parametrize(
    ("style", "text", "expected"),
    [
        ("think", "<think>reasoning</think> The answer is 4.", 1.0),
        ("think", "<think></think> 4", 0.0),
        ("think", "The answer is 4.", 0.0),
        ("think", "<think>never closed 4", 0.0),
        ("think_answer", "<think>r</think>\n<answer>4</answer>", 1.0),
        ("think_answer", "<think>r</think>\n<answer>4</answer> trailing", 0.0),
        ("boxed", "so \\boxed{4}", 1.0),
        ("answer_tags", "no tags", 0.0),
    ],
)
def test_format_styles(style: str, text: str, expected: float) -> None:
    assert get_reward("format", style=style)(RewardInput("q", text)).score == expected


def test_format_custom_pattern_and_unknown_style() -> None:
    assert get_reward("format", pattern=r"^Answer: \d+$")(RewardInput("q", "Answer: 12")).score == 1.0
    with pytest.raises(ValueError, match="unknown style 'fancy'"):
        get_reward("format", style="fancy")(RewardInput("q", "x"))


def test_overlong_penalty_matches_dapo() -> None:
    # L_max = 100, L_cache = 20: no penalty up to 80, linear to -1 at 100, -1 beyond
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 85, 90, 100, 101)] == [
        0.0,
        0.0,
        -0.25,
        -0.5,
        -1.0,
        -1.0,
    ]
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(10, 100, 0)
    reward = get_reward("overlong", max_len=100, cache_len=20)
    assert reward(RewardInput("q", "x", metadata={"response_length": 95})).score == -0.75


def judge(prompts: list[str]) -> list[str]:
    return ["Reasoning is fine.\nScore: 8" if "\\boxed{4}" in p else "I refuse to grade." for p in prompts]


def test_genrm_scores_and_unparsable_is_an_error_not_zero() -> None:
    seen: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        seen.append(prompts)
        return judge(prompts)

    model = GenerativeRewardModel(generate)
    out = model.score_batch([RewardInput("2+2?", "\\boxed{4}", "4"), RewardInput("2+2?", "five", "4")])
    assert isinstance(out[0], RewardResult) and out[0].score == 0.8
    assert isinstance(out[1], JudgeParseError) and "I refuse to grade." in str(out[1])
    assert len(seen) == 1 and "2+2?" in seen[0][0] and "Reference answer" in seen[0][0]
    with pytest.raises(JudgeParseError, match="no 'Score: N'"):
        model(RewardInput("2+2?", "five", "4"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Score: 10", 1.0), ("[[3]]", 0.3), ("<score>5</score>", 0.5), ("score = 2/4", 0.5),
     ("Score: 2 at first... Score: 9", 0.9), ("SCORE:7/10", 0.7)],
)  # fmt: skip
def test_genrm_parse_forms(text: str, expected: float) -> None:
    assert GenerativeRewardModel(judge).parse(text).score == expected


@pytest.mark.parametrize("text", ["Score: 11", "Score: -1", "Score: 3/0", "", "seven out of ten"])
def test_genrm_parse_rejects(text: str) -> None:
    with pytest.raises(JudgeParseError):
        GenerativeRewardModel(judge).parse(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("YES", 1.0), ("No, because 5 is wrong. Yes?", 0.0), (" yes.", 1.0)]
)
def test_genrm_yes_no_parser(text: str, expected: float) -> None:
    model = GenerativeRewardModel(judge, parser="yes_no")
    assert model.parse(text).score == expected and "YES or NO" in model.judge_prompt(RewardInput("q", "a"))
    with pytest.raises(JudgeParseError, match="no YES/NO"):
        model.parse("Maybe. Eyes open, nothing known.")
    with pytest.raises(ValueError, match="unknown parser 'stars'"):
        GenerativeRewardModel(judge, parser="stars")


def test_genrm_registered_with_dotted_generate() -> None:
    reward = get_reward("genrm", generate=f"{__name__}:judge")
    assert reward(RewardInput("q", "\\boxed{4}")).score == 0.8
    with pytest.raises(JudgeParseError):
        reward(RewardInput("q", "no box"))


def test_genrm_scorer_calls_score_batch_once_per_batch() -> None:
    """The scorer hands the generative judge the whole batch in one generate call."""
    before = len(CALLS)
    spec = RewardSpec("genrm", 1.0, {"generate": f"{__name__}:counting_judge"})
    with RewardScorer([spec], isolation="thread", max_workers=2) as scorer:
        out = scorer.score([RewardInput("q", c) for c in ("\\boxed{4}", "x", "\\boxed{4}", "y", "z")])
        metrics = scorer.metrics()
    assert [len(c) for c in CALLS[before:]] == [5]
    assert [r.score for r in out] == [0.8, 0.0, 0.8, 0.0, 0.0] and metrics["reward/genrm/errors"] == 3.0


CALLS: list[list[str]] = []


def counting_judge(prompts: list[str]) -> list[str]:
    CALLS.append(list(prompts))
    return judge(prompts)


def test_char_share_counts_the_share_of_allowed_characters() -> None:
    reward = get_reward("char_share")
    assert reward(RewardInput(prompt="", completion="12ab")).score == pytest.approx(0.5)
    letters = get_reward("char_share", chars="abc")
    assert letters(RewardInput(prompt="", completion="a1b2c3x")).score == pytest.approx(3 / 7)
    empty = reward(RewardInput(prompt="", completion=""))
    assert empty.score == 0.0 and "empty" in empty.reason
    with pytest.raises(ValueError, match="chars"):
        get_reward("char_share", chars="")(RewardInput(prompt="", completion="1"))
