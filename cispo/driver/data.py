"""Prompts through Hugging Face `datasets`: procedural generators, local JSONL/parquet, hub datasets.

Every source becomes a Dataset with three string columns: prompt, answer, metadata (JSON). A row that
lacks a field fails at load time with its index and the field's name, before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import datasets

from cispo.core.config import DataConfig
from cispo.core.types import PromptGroup


def is_held_out(a: int, b: int) -> bool:
    """About 1 pair in 10 is held out, chosen by a hash so that no digit pattern is missing from training."""
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] < 26


def _addition_rows(n: int, split: str, seed: int, digits: int = 2) -> list[dict[str, str]]:
    """a+b= with two fixed-width operands; eval pairs never occur in the train split."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rng = random.Random(f"{seed}-{split}")
    rows = []
    while len(rows) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if is_held_out(a, b) != (split == "eval"):
            continue
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "metadata": "{}"})
    return rows


def _reasoning_gym_rows(
    n: int, split: str, seed: int, name: str, kwargs: dict[str, Any]
) -> list[dict[str, str]]:
    import reasoning_gym

    # Distinct seeds keep eval entries out of the training stream.
    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed * 2 + (split == "eval"), **kwargs)
    rows = []
    for entry in dataset:
        meta = {"reasoning_gym": {"dataset": name, "entry": entry}}
        # Generators may put Fractions etc. in metadata: stored as strings (scorers compare text).
        metadata = json.dumps(meta, default=str)
        rows.append({"prompt": entry["question"], "answer": str(entry["answer"]), "metadata": metadata})
    return rows


# Holds configs/: a link to <repo>/configs, or package data in a wheel install.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_data_file(path: str, key: str) -> Path:
    """A data file named in a config: as given (relative to the working directory), or else a relative
    "configs/..." path inside the installed package, so that a preset's shipped data (e.g.
    configs/data/scratchpad_rl.jsonl.gz) is found from any directory."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    shipped = PACKAGE_DIR / given
    if not given.is_absolute() and given.parts[:1] == ("configs",) and shipped.is_file():
        return shipped
    raise ValueError(f"config error at {key}: no file {str(given)!r} (working directory {str(Path.cwd())!r})")


def _file_rows(cfg: DataConfig, split: str) -> datasets.Dataset:
    if cfg.source == "hub":
        return datasets.load_dataset(cfg.path, split=cfg.split if split == "train" else "test")
    kind = "json" if cfg.source == "jsonl" else "parquet"
    path = resolve_data_file(cfg.path, "data.path")
    if path.stat().st_size == 0:
        # datasets' JSON builder fails on an empty file with a bare StopIteration.
        raise ValueError(f"config error at data.path: {str(path)!r} is empty")
    dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    n_eval = min(cfg.num_eval, len(dataset) // 5)
    # The last rows are held out: a file's order is the user's, so the split is predictable.
    return dataset.select(
        range(len(dataset) - n_eval, len(dataset)) if split == "eval" else range(len(dataset) - n_eval)
    )


def _normalise(raw: datasets.Dataset, cfg: DataConfig, origin: str) -> datasets.Dataset:
    rows = []
    for index, row in enumerate(raw):
        for key in (cfg.prompt_key, cfg.answer_key):
            if key not in row or row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
                raise ValueError(f"{origin}: row {index} has no usable {key!r} field (keys: {sorted(row)})")
        if not isinstance(row[cfg.prompt_key], str):
            raise ValueError(
                f"{origin}: row {index} field {cfg.prompt_key!r} must be a string, "
                f"got {type(row[cfg.prompt_key]).__name__}"
            )
        metadata = row.get("metadata", "{}")
        rows.append(
            {
                "prompt": row[cfg.prompt_key],
                "answer": row[cfg.answer_key]
                if isinstance(row[cfg.answer_key], str)
                else json.dumps(row[cfg.answer_key]),
                "metadata": metadata if isinstance(metadata, str) else json.dumps(metadata),
            }
        )
    return datasets.Dataset.from_list(rows)


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """The train or eval split as a Dataset(prompt, answer, metadata)."""
    n = cfg.num_train if split == "train" else cfg.num_eval
    if n == 0 and cfg.source in ("addition", "reasoning_gym"):
        return datasets.Dataset.from_dict({"prompt": [], "answer": [], "metadata": []})
    if cfg.source == "addition":
        return datasets.Dataset.from_list(_addition_rows(n, split, cfg.seed, **cfg.generator_kwargs))
    if cfg.source == "reasoning_gym":
        if not cfg.generator:
            raise ValueError(
                "config error at data.generator: name a reasoning-gym dataset, e.g. basic_arithmetic"
            )
        rows = _reasoning_gym_rows(n, split, cfg.seed, cfg.generator, cfg.generator_kwargs)
        return datasets.Dataset.from_list(rows)
    return _normalise(_file_rows(cfg, split), cfg, origin=f"{cfg.source} dataset {cfg.path!r} ({split})")


def load_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval), loaded once at start-up; an empty train split is a config error naming its source."""
    train = load_split(cfg, "train")
    if len(train) == 0:
        where = f"data.path={cfg.path!r}" if cfg.path else f"data.source={cfg.source!r}"
        raise ValueError(f"config error at data: the train split of {where} has no rows")
    return train, load_split(cfg, "eval")


class PromptStream:
    """Endless shuffled passes over the train split, tokenised into PromptGroups, with a resumable cursor."""

    def __init__(self, dataset: datasets.Dataset, tokenizer: Any, cfg: DataConfig, group_size: int) -> None:
        if len(dataset) == 0:
            raise ValueError("the train split is empty")
        self.dataset, self.tokenizer, self.cfg, self.group_size = dataset, tokenizer, cfg, group_size
        self.cursor = 0
        self._order: list[int] = []
        self._epoch = -1

    def _row_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            self._order = list(range(len(self.dataset)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order[offset]

    def next_groups(self, n: int) -> list[PromptGroup]:
        groups = [
            self.make_group(self.cursor + i, self.dataset[self._row_at(self.cursor + i)]) for i in range(n)
        ]
        self.cursor += n
        return groups

    def make_group(self, index: int, row: dict[str, str]) -> PromptGroup:
        return PromptGroup(
            index=index,
            prompt_ids=encode_prompt(self.tokenizer, self.cfg, row["prompt"]),
            prompt_text=row["prompt"],
            reference=row["answer"],
            metadata=json.loads(row["metadata"]),
            group_size=self.group_size,
        )

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = int(state["cursor"])


def encode_prompt(tokenizer: Any, cfg: DataConfig, prompt: str) -> list[int]:
    text = cfg.prompt_template.format(prompt=prompt)
    if cfg.chat_template:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eval_groups(dataset: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> list[PromptGroup]:
    if len(dataset) == 0:
        return []
    stream = PromptStream(dataset, tokenizer, cfg, group_size=1)
    return [stream.make_group(i, dataset[i]) for i in range(len(dataset))]
