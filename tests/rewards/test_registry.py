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
)

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
    assert {"math", "logic", "code", "code_io", "format", "overlong", "exact_match", "genrm"} <= names


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; registered: code, code_io"):
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
