"""The plugin contract: names, dotted paths, entry points, signature checks, result checks."""

from __future__ import annotations

import pytest

from rewards import (
    RewardError,
    RewardInput,
    RewardResult,
    available_rewards,
    get_reward,
    register_reward,
    registry,
    reward_range,
)
from rewards.registry import load_reward, metric_keys, reward_key

SAMPLE = RewardInput(prompt="2+2?", completion="The final answer is 4.", reference="4")


def plugin_two_args(completion: str, reference: str) -> float:
    return float(reference in completion)


def plugin_with_kwargs(inp: RewardInput, *, scale: float) -> RewardResult:
    return RewardResult(scale, "scaled")


def plugin_bad_signature(a: str, b: str, c: str) -> float:
    return 0.0


def plugin_returns_str(inp: RewardInput) -> str:
    return "yes"


def plugin_out_of_range(inp: RewardInput) -> float:
    return 1.5


def test_builtin_names_registered() -> None:
    names = set(available_rewards())
    builtin = {"math", "logic", "code", "code_io", "format", "overlong", "exact_match", "genrm", "char_share"}
    assert builtin <= names


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; registered: char_share, code, code_io"):
        get_reward("nope")


def test_dotted_path_two_arg_plugin() -> None:
    fn = get_reward(f"{__name__}:plugin_two_args")
    assert fn(SAMPLE) == RewardResult(1.0, "")
    assert fn(RewardInput("q", "5", reference="4")).score == 0.0


def test_dotted_path_errors_name_the_thing() -> None:
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        get_reward("no_such_mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward(f"{__name__}:missing")


def test_kwargs_are_checked_against_the_signature() -> None:
    assert get_reward(f"{__name__}:plugin_with_kwargs", scale=0.25)(SAMPLE) == RewardResult(0.25, "scaled")
    with pytest.raises(TypeError, match="missing required argument.*scale"):
        get_reward(f"{__name__}:plugin_with_kwargs")
    with pytest.raises(TypeError, match="unknown argument.*'nope'"):
        get_reward(f"{__name__}:plugin_with_kwargs", scale=1.0, nope=2)
    with pytest.raises(TypeError, match="reward 'overlong': missing required argument"):
        get_reward("overlong")


def test_bad_signature_rejected_at_load() -> None:
    with pytest.raises(TypeError, match="plugin_bad_signature.*expected fn\\(input: RewardInput"):
        get_reward(f"{__name__}:plugin_bad_signature")


def test_bad_return_values_raise_reward_error() -> None:
    with pytest.raises(RewardError, match="returned str"):
        get_reward(f"{__name__}:plugin_returns_str")(SAMPLE)
    with pytest.raises(RewardError, match=r"returned 1.5 outside \[0.0, 1.0\]"):
        get_reward(f"{__name__}:plugin_out_of_range")(SAMPLE)


def test_entry_point_group_loads_math(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide the registered name so the lookup falls through to the installed 'cispo.rewards' entry point.
    hidden = registry.REWARDS
    monkeypatch.setattr(hidden, "_lazy", {k: v for k, v in hidden._lazy.items() if k != "math"})
    monkeypatch.setattr(hidden, "_entries", {k: v for k, v in hidden._entries.items() if k != "math"})
    fn = get_reward("math")
    assert fn(SAMPLE).score == 1.0 and fn(RewardInput("q", "\\boxed{5}", "4")).score == 0.0


def test_register_reward_rejects_duplicate_names() -> None:
    @register_reward("test_only_once")
    def first(inp: RewardInput) -> float:
        return 1.0

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_only_once")(plugin_two_args)
    assert get_reward("test_only_once")(SAMPLE).score == 1.0


# --- score ranges: declared on the function, found however it is named; the config overrides ----------

PENALTY_PLUGIN = """
from rewards import RewardInput, reward_range


@reward_range(-1, 1)
def signed(inp: RewardInput) -> float:
    return -0.5 if "bad" in inp.completion else 1.0


def plain(inp: RewardInput) -> float:
    return -0.5
"""


@reward_range(-2.0, 0.0)
def plugin_declared_penalty(inp: RewardInput) -> float:
    return -1.5


@register_reward("test_registry_signed", low=-1.0, high=1.0)
def plugin_registered_signed(inp: RewardInput) -> float:
    return -1.0


def test_a_declared_range_holds_for_a_file_path_a_module_path_and_a_name(tmp_path) -> None:
    (tmp_path / "penalties.py").write_text(PENALTY_PLUGIN)
    by_file = get_reward(f"{tmp_path / 'penalties.py'}:signed")
    assert (by_file.low, by_file.high) == (-1.0, 1.0)
    assert by_file(RewardInput("q", "bad", "x")).score == -0.5
    assert get_reward(f"{__name__}:plugin_declared_penalty")(SAMPLE).score == -1.5
    # register_reward(low=, high=) used to be lost when the same function was named by its path
    assert get_reward("test_registry_signed")(SAMPLE).score == -1.0
    assert get_reward(f"{__name__}:plugin_registered_signed")(SAMPLE).score == -1.0
    # the built-in penalty keeps its registered range
    overlong = get_reward("overlong", max_len=10, cache_len=5)
    assert (overlong.low, overlong.high) == (-1.0, 0.0)


def test_the_config_range_overrides_the_declared_one(tmp_path) -> None:
    (tmp_path / "penalties.py").write_text(PENALTY_PLUGIN)
    plain = f"{tmp_path / 'penalties.py'}:plain"
    with pytest.raises(
        RewardError, match=r"reward '.*penalties.py:plain' returned -0.5 outside \[0.0, 1.0\]"
    ):
        get_reward(plain)(SAMPLE)
    assert load_reward(plain, {}, low=-1)(SAMPLE).score == -0.5  # high stays the declared/default 1.0
    assert (load_reward(plain, {}, low=-1).low, load_reward(plain, {}, low=-1).high) == (-1.0, 1.0)
    narrowed = load_reward(f"{__name__}:plugin_declared_penalty", {}, low=-1.0)
    with pytest.raises(RewardError, match=r"plugin_declared_penalty' returned -1.5 outside \[-1.0, 0.0\]"):
        narrowed(SAMPLE)


@pytest.mark.parametrize(("low", "high"), [(1.0, 0.0), (0.0, 0.0), (0.0, float("inf")), ("a", 1.0)])
def test_a_bad_range_is_refused_naming_the_reward(low: object, high: object) -> None:
    with pytest.raises(ValueError, match=r"reward 'format': score range"):
        load_reward("format", {}, low=low, high=high)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score range"):
        reward_range(low, high)  # type: ignore[arg-type]


def test_metric_keys_use_short_names_and_stay_distinct() -> None:
    assert reward_key("/abs/dir/myrewards.py:digit_credit") == "digit_credit"
    assert reward_key("myrewards:digit_credit") == "digit_credit" and reward_key("math") == "math"
    assert metric_keys(["exact_match", "/abs/dir/myrewards.py:digit_credit"]) == [
        "exact_match",
        "digit_credit",
    ]
    assert metric_keys(["math", "mine.rewards:math", "/x/y.py:math"]) == [
        "math",
        "mine.rewards:math",
        "y:math",
    ]
    assert metric_keys(["format", "format"]) == ["format", "format_2"]


# --- registered defaults: a list naming a built-in scores as its config group does ---------------------


def test_exact_match_defaults_to_the_whole_completion() -> None:
    # configs/reward/exact_match.yaml no longer carries `extract: none`; the default does (issue #22).
    assert get_reward("exact_match")(RewardInput("12+34=", " 46\n", "46")).score == 1.0
    assert get_reward("exact_match")(RewardInput("q", "#### 46", "46")).score == 0.0
    assert get_reward("exact_match", extract="final_answer")(RewardInput("q", "#### 46", "46")).score == 1.0


def test_reward_groups_named_after_a_reward_set_no_kwargs_a_list_would_lose() -> None:
    """configs/reward/<name>.yaml gives reward <name> only its own defaults, so a user's reward.rewards list
    naming <name> (which replaces the group's list) scores as `reward=<name>` does. (Presets under other
    names, such as judge.yaml, are configurations and may set what they like.)"""
    import inspect
    from pathlib import Path

    import yaml

    from cispo.core.registry import callable_from

    groups = sorted((Path(__file__).resolve().parents[2] / "configs" / "reward").glob("*.yaml"))
    checked = 0
    for group in groups:
        for item in yaml.safe_load(group.read_text())["rewards"]:
            if item["name"] != group.stem:
                continue
            checked += 1
            params = inspect.signature(callable_from(registry.REWARDS, item["name"])).parameters
            for key, value in item.get("kwargs", {}).items():
                assert params[key].default == value, f"{group.name}: {item['name']}.{key}={value!r}"
    assert checked >= 3  # exact_match, math, logic at least


def test_the_full_score_of_a_mix_counts_a_penalty_at_its_best() -> None:
    """Evaluation calls a sample correct at the mix's full score: with a penalty in the mix that used to be
    the sum of the positive weights, which no sample could reach."""
    from types import SimpleNamespace

    from cispo.core.config import RewardConfig, RewardItem, TrainConfig
    from cispo.driver.rollout_stage import RolloutStage
    from rewards.registry import full_score
    from rewards.scorer import RewardSpec

    overlong = {"max_len": 10, "cache_len": 5}
    mix = [RewardSpec("exact_match"), RewardSpec("overlong", 0.5, overlong), RewardSpec("format", -0.25)]
    assert full_score(mix) == 1.0
    assert full_score([RewardSpec(f"{__name__}:plugin_two_args", 2.0, low=-1.0, high=3.0)]) == 6.0
    items = [RewardItem(name="exact_match"), RewardItem(name="overlong", weight=0.5, kwargs=overlong)]
    cfg = TrainConfig(reward=RewardConfig(rewards=items))
    stage = RolloutStage(cfg, SimpleNamespace(eos_token_id=1, pad_token_id=0), None, (None, None), None, [])
    assert stage.full_reward == 1.0
