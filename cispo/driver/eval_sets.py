"""The evaluation sets of `eval.sets` (cispo.core.eval_config): loaded at start-up, tokenised into prompt
groups of `samples` each, scored into eval/<set>/<metric> keys.

A set without `data` on the "eval" split is the run's own held-out split (the prompts the rollout stage
already holds, not loaded twice); any other set loads through cispo.driver.data.load_split with its
`data` fields put over the run's `data` (dataclasses.replace, so DataConfig's own checks run on them).
Loading happens before any model is built, so a wrong path fails at once, naming the set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from cispo.core.config import DataConfig, TrainConfig
from cispo.core.eval_config import EvalSetConfig
from cispo.core.types import PromptGroup, Sample
from cispo.driver.data import check_prompt_lengths, eval_groups, load_split
from cispo.driver.eval_metrics import set_metrics


@dataclass
class EvalSet:
    """A set's settings and its prompt groups (group_size = samples per prompt)."""

    cfg: EvalSetConfig
    groups: list[PromptGroup]


@dataclass
class LoadedSet:
    """A set's rows, loaded at start-up; `dataset` None: the run's held-out split."""

    cfg: EvalSetConfig
    data: DataConfig
    dataset: datasets.Dataset | None


def held_out_set(groups: list[PromptGroup], cfg: EvalSetConfig | None = None) -> EvalSet:
    """The held-out split as a set: one greedy sample per prompt unless `cfg` says otherwise."""
    cfg = cfg or EvalSetConfig()
    chosen = groups[: cfg.num] if cfg.num else groups
    return EvalSet(cfg, [dataclasses.replace(g, group_size=cfg.samples) for g in chosen])


def uses_held_out(cfg: EvalSetConfig) -> bool:
    return not cfg.data and cfg.split == "eval"


def load_eval_sets(cfg: TrainConfig) -> list[LoadedSet]:
    """Every set's rows (the held-out split's left to the caller), checked: a sampled set with a
    temperature of 0 and a set with no rows are config errors naming the set."""
    loaded = []
    for index, item in enumerate(cfg.eval.sets):
        key = f"eval.sets[{index}]"
        temperature = cfg.rollout.eval_temperature if item.temperature is None else item.temperature
        if item.samples > 1 and temperature == 0:
            raise ValueError(
                f"config error at {key}.temperature: {item.samples} samples a prompt at temperature 0 "
                "(rollout.eval_temperature, the default) are copies of one greedy answer; set one > 0"
            )
        if uses_held_out(item):
            loaded.append(LoadedSet(item, cfg.data, None))
            continue
        try:
            data = dataclasses.replace(cfg.data, **item.data)
            dataset = load_split(data, item.split)
        except ValueError as err:  # DataConfig's checks and the loader name data.*: say which set's
            raise ValueError(str(err).replace("config error at data", f"config error at {key}.data")) from err
        if item.num:
            dataset = dataset.select(range(min(item.num, len(dataset))))
        if len(dataset) == 0:
            raise ValueError(f"config error at {key}: set {item.name!r} has no rows ({item.split} split)")
        loaded.append(LoadedSet(item, data, dataset))
    return loaded


def check_eval_prompts(
    loaded: list[LoadedSet], tokenizer: Any, limit: int | None, why: str, say: Callable[[str], None]
) -> None:
    """Every prompt of a set that is not the held-out split (checked with the run's splits) fits the
    model's context with the budget, as the training prompts must (data.truncate_prompts applies)."""
    if limit is None:
        return
    for item in loaded:
        if item.dataset is None:
            continue
        split = f"{item.cfg.name} eval set"
        truncated = check_prompt_lengths(item.dataset, tokenizer, item.data, limit, why, split)
        if truncated:
            say(f"data.truncate_prompts: {truncated} prompt(s) of {split} keep their last {limit} tokens")


def build_eval_sets(
    loaded: list[LoadedSet], tokenizer: Any, held_out: list[PromptGroup], limit: int | None
) -> list[EvalSet]:
    """The sets as prompt groups: the held-out ones from `held_out` (the stage's), the others tokenised
    with their own data settings (template, chat template; with truncate_prompts, a prompt longer than
    `limit` keeps its last tokens)."""
    sets = []
    for item in loaded:
        if item.dataset is None:
            sets.append(held_out_set(held_out, item.cfg))
            continue
        cut = limit if item.data.truncate_prompts else None
        groups = eval_groups(item.dataset, tokenizer, item.data, cut)
        sets.append(EvalSet(item.cfg, [dataclasses.replace(g, group_size=item.cfg.samples) for g in groups]))
    return sets


def score_set(eval_set: EvalSet, per_prompt: list[list[Sample]], full_reward: float) -> dict[str, float]:
    """The set's metrics: a sample is correct when it earns the full reward (every reward at its best)."""
    counts = [(len(s), sum(x.reward >= full_reward - 1e-6 for x in s)) for s in per_prompt]
    return set_metrics(counts, eval_set.cfg.metrics, eval_set.cfg.samples)


def set_keys(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """eval/<set>/<metric>."""
    return {f"eval/{name}/{key}": value for key, value in metrics.items()}
