"""Logic and procedural tasks from reasoning-gym, each checked by its dataset's own scorer.

Convention: ``metadata["reasoning_gym"] = {"dataset": <name>, "entry": <generator entry dict>}``, or the
reference *is* the entry (its ``metadata["source_dataset"]`` names the dataset).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rewards.base import RewardInput, RewardResult
from rewards.extract import answer_tag, last_boxed


@functools.cache
def _scorer(dataset: str) -> Callable[[str, dict], float]:
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(dataset)
    except Exception as e:
        raise ValueError(f"logic reward: unknown reasoning-gym dataset {dataset!r} ({e})") from e


def extract_answer(completion: str) -> str:
    """``<answer>..</answer>``, else ``\\boxed{}``, else the whole stripped completion if one line, else the
    last non-empty line."""
    for found in (answer_tag(completion), last_boxed(completion)):
        if found is not None:
            return found.strip()
    text = completion.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if len(lines) > 1 else text


def _locate(inp: RewardInput, dataset: str | None) -> tuple[str, dict]:
    meta = inp.metadata.get("reasoning_gym") if isinstance(inp.metadata, dict) else None
    entry: Any = meta.get("entry") if isinstance(meta, dict) else None
    name = dataset or (meta.get("dataset") if isinstance(meta, dict) else None)
    if entry is None and isinstance(inp.reference, dict):
        entry = inp.reference
    if not isinstance(entry, dict):
        raise ValueError(
            "logic reward: no reasoning-gym entry; put {'dataset': name, 'entry': entry} in "
            "metadata['reasoning_gym'] or pass the entry as the reference"
        )
    name = name or entry.get("metadata", {}).get("source_dataset")
    if not name:
        raise ValueError("logic reward: dataset name missing (set metadata['reasoning_gym']['dataset'])")
    return name, entry


def logic_reward(inp: RewardInput, *, dataset: str | None = None) -> RewardResult:
    """Score with the reasoning-gym dataset's scorer; a scorer that raises gives 0 with the reason."""
    name, entry = _locate(inp, dataset)
    scorer = _scorer(name)
    answer = extract_answer(inp.completion)
    if not answer:
        return RewardResult(0.0, "logic: empty answer")
    try:
        value = float(scorer(answer, entry))
    except Exception as e:  # some scorers raise on odd answers: that is a wrong answer, not our error
        return RewardResult(0.0, f"logic: {name} scorer raised {type(e).__name__}: {str(e)[:80]}")
    return RewardResult(min(1.0, max(0.0, value)), "" if value > 0 else "logic: wrong answer")


def reasoning_gym_rows(dataset: str, size: int, seed: int = 0, **config: Any) -> list[dict]:
    """Dataset rows in the convention above: ``{"prompt", "reference", "metadata"}`` per entry."""
    import reasoning_gym

    data = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
    return [
        {
            "prompt": e["question"],
            "reference": e["answer"],
            "metadata": {"reasoning_gym": {"dataset": dataset, "entry": e}},
        }
        for e in data
    ]
