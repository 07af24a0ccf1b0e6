"""Prompts through Hugging Face `datasets`: procedural generators, local JSONL/parquet, hub datasets.

Every source becomes a Dataset with three string columns: prompt, answer, metadata (JSON). A row that
lacks a field fails at load time with its index and the field's name, before any training starts.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import datasets

from cispo.core.answers import ANSWER_EXTRACTORS
from cispo.core.config import DataConfig
from cispo.core.types import PromptGroup
from cispo.driver.hub_data import held_out_rows, hub_rows, shipped_path


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


def resolve_data_file(path: str, key: str) -> Path:
    """A data file named in a config: as given (relative to the working directory), or else a relative
    "configs/..." path inside the installed package, so that a preset's shipped data (e.g.
    configs/data/scratchpad_rl.jsonl.gz) is found from any directory."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    shipped = shipped_path(path)
    if shipped is not None and shipped.is_file():
        return shipped
    raise ValueError(f"config error at {key}: no file {str(given)!r} (working directory {str(Path.cwd())!r})")


def jsonl_rows(path: Path, key: str = "data.path") -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each row (non-blank line) of a JSONL file (optionally gzip),
    after checking each line is UTF-8 and one JSON object: a bad line fails here in one line naming the
    config key, the file and the line, not deep inside the `datasets` JSON builder (whose errors name
    neither)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"config error at {key}: {str(path)!r} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.pos + 1})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a JSON object per line, got a {type(row).__name__}")
            rows.append((number, row))
    return rows


def jsonl_lines(path: Path) -> list[int]:
    """The 1-based line numbers of a JSONL file's rows, each checked by :func:`jsonl_rows`."""
    return [number for number, _ in jsonl_rows(path)]


def _json_kind(value: Any) -> str | None:
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return None if value is None else kinds.get(type(value), type(value).__name__)


def jsonl_type_conflict(path: Path) -> str | None:
    """'line N: field F is a number, but line M has a string', for the first field whose JSON type changes
    between rows (one table needs one type per column); None when the types agree."""
    opener = gzip.open if path.suffix == ".gz" else open
    first: dict[str, tuple[str, int]] = {}
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            for key, value in (json.loads(text) if text.strip() else {}).items():
                kind = _json_kind(value)
                seen = first.setdefault(key, (kind, number)) if kind else (kind, number)
                if kind and seen[0] != kind:
                    return f"line {number}: field {key!r} is a {kind}, but line {seen[1]} has a {seen[0]}"
    return None


def _read_file(cfg: DataConfig, path_value: str, key: str) -> tuple[datasets.Dataset, list[int] | None]:
    """A jsonl/parquet file's rows and, for JSONL, each row's 1-based line in it."""
    path = resolve_data_file(path_value, key)
    if path.stat().st_size == 0:
        # datasets' JSON builder fails on an empty file with a bare StopIteration.
        raise ValueError(f"config error at {key}: {str(path)!r} is empty")
    lines = jsonl_lines(path) if cfg.source == "jsonl" else None
    try:
        dataset = datasets.load_dataset(
            "json" if cfg.source == "jsonl" else "parquet", data_files=str(path), split="train"
        )
    except Exception as err:  # noqa: BLE001 - datasets' errors are long chains; one line names the file
        cause = err.__cause__ or err
        why = (jsonl_type_conflict(path) if lines is not None else None) or (
            f"could not be read as {cfg.source}: {type(cause).__name__}: {str(cause).partition(chr(10))[0]}"
        )
        raise ValueError(f"config error at {key}: {str(path)!r} {why}") from err
    if lines is not None and len(lines) != len(dataset):
        lines = None  # the builder saw the rows differently: fall back to row numbers
    return dataset, lines


def _file_rows(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, list[int], str]:
    """The split's rows, each one's number in its file (the line of a JSONL file, else the row) and what
    that number is ("line" or "row")."""
    use_eval_file = split == "eval" and bool(cfg.eval_path)
    dataset, lines = _read_file(
        cfg, cfg.eval_path if use_eval_file else cfg.path, "data.eval_path" if use_eval_file else "data.path"
    )
    if use_eval_file:
        rows = range(min(cfg.num_eval, len(dataset)))
    else:
        rows = held_out_rows(len(dataset), 0 if cfg.eval_path else cfg.num_eval, split)
    selected = dataset.select(rows) if len(rows) else dataset.select([])  # an empty range is refused
    numbers = [lines[i] for i in rows] if lines is not None else [i + 1 for i in rows]
    return selected, numbers, "line" if lines is not None else "row"


def _bad_row(where: str, row: dict[str, Any], key: str) -> str | None:
    """Why column `key` of a row is unusable, or None."""
    value = row.get(key)
    if key not in row or value is None or (isinstance(value, str) and not value.strip()):
        return f"{where} has no usable {key!r} field (keys: {sorted(row)})"
    return None


def _reference(cfg: DataConfig, where: str, value: Any) -> str:
    """The row's reference answer: the answer column through data.answer_extractor."""
    if cfg.answer_extractor == "none":
        return value if isinstance(value, str) else json.dumps(value)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {cfg.answer_key!r} must be a string for data.answer_extractor="
            f"{cfg.answer_extractor}, got {type(value).__name__}"
        )
    answer = ANSWER_EXTRACTORS.get(cfg.answer_extractor)(value)
    if not answer:
        shown = value if len(value) <= 120 else "..." + value[-117:]
        raise ValueError(
            f"{where}: data.answer_extractor={cfg.answer_extractor} found no answer in field "
            f"{cfg.answer_key!r}: {shown!r}"
        )
    return answer


def _normalise(
    raw: datasets.Dataset, cfg: DataConfig, origin: str, numbers: list[int], unit: str = "row"
) -> datasets.Dataset:
    rows = []
    for index, row in enumerate(raw):
        where = f"{origin} {unit} {numbers[index]}"
        for key in (cfg.prompt_key, cfg.answer_key):
            if (why := _bad_row(where, row, key)) is not None:
                raise ValueError(why)
        if not isinstance(row[cfg.prompt_key], str):
            raise ValueError(
                f"{where}: field {cfg.prompt_key!r} must be a string, "
                f"got {type(row[cfg.prompt_key]).__name__}"
            )
        metadata = row.get("metadata", "{}")
        rows.append(
            {
                "prompt": row[cfg.prompt_key],
                "answer": _reference(cfg, where, row[cfg.answer_key]),
                "metadata": metadata if isinstance(metadata, str) else json.dumps(metadata),
                # Where the row came from, for messages about it later (a prompt too long for the model).
                "line": numbers[index],
            }
        )
    if not rows:
        return datasets.Dataset.from_dict({"prompt": [], "answer": [], "metadata": [], "line": []})
    return datasets.Dataset.from_list(rows)


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """The train or eval split as a Dataset(prompt, answer, metadata[, line]), honouring every DataConfig
    field: source, path/eval_path, name/split/eval_split, the column keys, the answer extractor and
    num_train/num_eval (a file's train split keeps all its rows but the held-out ones)."""
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
    if cfg.source == "hub":
        raw, numbers, name = hub_rows(cfg, split)
        origin = f"config error at data.path: {cfg.path!r} (hub, {split} rows, from split {name!r})"
        return _normalise(raw, cfg, origin, numbers)
    raw, numbers, unit = _file_rows(cfg, split)
    path = cfg.eval_path if split == "eval" and cfg.eval_path else cfg.path
    key = "data.eval_path" if split == "eval" and cfg.eval_path else "data.path"
    origin = f"config error at {key}: {path!r} ({cfg.source}, {split} split)"
    return _normalise(raw, cfg, origin, numbers, unit)


def load_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval), loaded once at start-up; an empty train split is a config error naming its source."""
    train = load_split(cfg, "train")
    if len(train) == 0:
        where = f"data.path={cfg.path!r}" if cfg.path else f"data.source={cfg.source!r}"
        raise ValueError(f"config error at data: the train split of {where} has no rows")
    return train, load_split(cfg, "eval")


class PromptStream:
    """Endless shuffled passes over the train split, tokenised into PromptGroups, with a resumable cursor.
    Prompts longer than `max_prompt_tokens` (when set) keep their last tokens (data.truncate_prompts)."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        tokenizer: Any,
        cfg: DataConfig,
        group_size: int,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the train split is empty")
        self.dataset, self.tokenizer, self.cfg, self.group_size = dataset, tokenizer, cfg, group_size
        self.max_prompt_tokens = max_prompt_tokens
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

    def group_at(self, index: int) -> PromptGroup:
        """The group at position `index` of the stream (any position: the order is a function of it)."""
        return self.make_group(index, self.dataset[self._row_at(index)])

    def make_group(self, index: int, row: dict[str, str]) -> PromptGroup:
        return PromptGroup(
            index=index,
            prompt_ids=encode_prompt(self.tokenizer, self.cfg, row["prompt"], self.max_prompt_tokens),
            prompt_text=row["prompt"],
            reference=row["answer"],
            metadata=json.loads(row["metadata"]),
            group_size=self.group_size,
        )

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = int(state["cursor"])


def _template_text(value: str) -> str:
    """data.custom_chat_template: Jinja text as it is, or the file it names (read once)."""
    if "{{" in value or "{%" in value:
        return value
    return _read_template(str(resolve_data_file(value, "data.custom_chat_template")))


@functools.lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def chat_template(tokenizer: Any, cfg: DataConfig) -> str | None:
    """The Jinja chat template the prompts go through, or None for the raw prompt: data.chat_template
    auto uses the custom or the tokenizer's template when there is one (instruct models), true requires
    one, false never uses one."""
    if cfg.chat_template == "false":
        return None
    template = _template_text(cfg.custom_chat_template) if cfg.custom_chat_template else None
    template = template or getattr(tokenizer, "chat_template", None) or None
    if template is None and cfg.chat_template == "true":
        raise ValueError(
            "config error at data.chat_template: true, but the tokenizer has no chat template; give one "
            "in data.custom_chat_template, or set data.chat_template=auto (the raw prompt for such a model)"
        )
    return template


def prompt_text(tokenizer: Any, cfg: DataConfig, prompt: str) -> str:
    """The text the policy sees, the one place prompts are built (training's stream, the held-out split,
    evaluation sets, cispo-eval and the warm start all come here): data.prompt_template filled in, then
    the chat template (with data.system_prompt as the system message and the assistant's turn opened),
    or, with none, the system prompt and a blank line before it."""
    text = cfg.prompt_template.format(prompt=prompt)
    template = chat_template(tokenizer, cfg)
    if template is None:
        return f"{cfg.system_prompt}\n\n{text}" if cfg.system_prompt else text
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages = [*system, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=template
    )


def encode_prompt(tokenizer: Any, cfg: DataConfig, prompt: str, max_tokens: int | None = None) -> list[int]:
    """The prompt's token ids; with `max_tokens`, only its last `max_tokens` (left-truncated: the question
    is usually at the end, and the model continues from the end)."""
    ids = list(tokenizer(prompt_text(tokenizer, cfg, prompt), add_special_tokens=False)["input_ids"])
    return ids[-max_tokens:] if max_tokens is not None and len(ids) > max_tokens else ids


def prompt_lengths(dataset: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Every row's prompt length in tokens, tokenised in batches (fast tokenizers batch natively)."""
    lengths: list[int] = []
    for start in range(0, len(dataset), 1024):
        texts = [prompt_text(tokenizer, cfg, p) for p in dataset[start : start + 1024]["prompt"]]
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def check_prompt_lengths(
    dataset: datasets.Dataset, tokenizer: Any, cfg: DataConfig, limit: int, why: str, split: str
) -> int:
    """Refuses the first prompt longer than `limit` tokens, naming its row (the file's line for a file)
    and the lengths; with data.truncate_prompts, returns how many will be left-truncated instead."""
    too_long = [(i, n) for i, n in enumerate(prompt_lengths(dataset, tokenizer, cfg)) if n > limit]
    if too_long and not cfg.truncate_prompts:
        index, length = too_long[0]
        row = dataset[index]
        path = cfg.eval_path if split == "eval" and cfg.eval_path else cfg.path
        where = f"{path!r} line {row['line']}" if cfg.source == "jsonl" else f"{split} split row {index + 1}"
        raise ValueError(
            f"config error at data: {where}: the prompt is {length} tokens, more than the {limit} that {why} "
            f"({len(too_long)} such prompt(s) in the {split} split); shorten them, or set "
            "data.truncate_prompts=true to keep each one's last tokens"
        )
    return len(too_long)


def eval_groups(
    dataset: datasets.Dataset, tokenizer: Any, cfg: DataConfig, max_prompt_tokens: int | None = None
) -> list[PromptGroup]:
    if len(dataset) == 0:
        return []
    stream = PromptStream(dataset, tokenizer, cfg, group_size=1, max_prompt_tokens=max_prompt_tokens)
    return [stream.make_group(i, dataset[i]) for i in range(len(dataset))]
