"""A short supervised warm start so that RL begins from a policy that is sometimes right.

Cross-entropy on the answer tokens of (prompt, answer) training rows until the held-out accuracy reaches
the target (or a step / time limit). The result is cached on disk under a key made of everything that
determines it: the settings, and the contents themselves (the initial weights, the tokenizer's vocabulary
and templates, every training and held-out row and their counts), so an edited data file or a changed
`data.num_train` never reuses a stale start, while later runs with the same inputs start at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cispo.core.config import DataConfig, ModelConfig, TrainConfig
from cispo.driver.data import encode_prompt, jsonl_rows, resolve_data_file


def content_digest(
    model: torch.nn.Module, tokenizer: Any, train_rows: Iterable[Any], eval_rows: Iterable[Any]
) -> str:
    """SHA-256 of what the warm start reads: the initial weights, the tokenizer (vocabulary, special
    tokens, chat template) and every training and held-out row, in order, with their counts."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items())
    special = [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps([vocab, special], default=str).encode())
    for split in (train_rows, eval_rows):
        count = 0
        for row in split:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
            count += 1
        digest.update(f"rows:{count}".encode())
    return digest.hexdigest()


def cache_key(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, content: str = "") -> str:
    """The settings that determine a warm start, and `content` (content_digest: the data and weights)."""
    warm = asdict(model_cfg.warmstart)
    warm.pop("cache_dir")
    if warm["lr_schedule"] == "constant":
        warm.pop("lr_schedule")  # keys made before the field existed stay valid (every cached start)
    payload = {
        # The resolved tokenizer, so an empty model.tokenizer (the model's own) keys like its value.
        "model": {
            **{k: v for k, v in asdict(model_cfg).items() if k != "warmstart"},
            "tokenizer": model_cfg.tokenizer_spec(),
        },
        "warmstart": warm,
        "data": {
            k: getattr(data_cfg, k)
            for k in (
                "source",
                "path",
                "generator",
                "generator_kwargs",
                "prompt_template",
                "chat_template",
                "custom_chat_template",
                "system_prompt",
                "seed",
                "num_train",
                "num_eval",
            )
        },
        "seed": seed,
        "content": content,
        "format": 3,  # bump when data generation or this stage's code changes what a key produces
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lr_factor(schedule: str, max_steps: int, step: int) -> float:
    """The multiple of model.warmstart.lr used for the update after `step` updates."""
    if schedule == "constant" or max_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))


def _sft_batch(rows: list[dict[str, str]], tokenizer: Any, data_cfg: DataConfig) -> dict[str, torch.Tensor]:
    sequences, prompt_lengths = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, data_cfg, row["prompt"])
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, p : len(seq)] = torch.tensor(seq[p:])
        attention[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def supervised_warmstart(
    model: torch.nn.Module,
    tokenizer: Any,
    train_rows: Any,
    evaluate: Callable[[torch.nn.Module], float],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    seed: int,
    log: Callable[[str], None] = print,
    eval_rows: Iterable[Any] = (),
) -> dict[str, float]:
    """Trains `model` in place (or loads the cached result). `eval_rows`: the held-out rows `evaluate`
    judges on (part of the cache key, since they decide when the warm start stops).

    Returns {"accuracy", "steps", "seconds", "cached"}.
    """
    cfg = model_cfg.warmstart
    content = content_digest(model, tokenizer, train_rows, eval_rows)
    directory = Path(cfg.resolved_cache_dir()).expanduser() / cache_key(model_cfg, data_cfg, seed, content)
    cached = _load_cached(directory, model, log)
    if cached is not None:
        return cached
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, cfg.lr_schedule, cfg.max_steps)
    )
    rng = random.Random(seed)
    start, accuracy, step = time.monotonic(), evaluate(model), 0
    while (
        accuracy < cfg.target_accuracy and step < cfg.max_steps and time.monotonic() - start < cfg.max_time_s
    ):
        model.train()
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in range(cfg.batch_size)]
        loss = model(**_sft_batch(rows, tokenizer, data_cfg)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if step % cfg.eval_every == 0:
            accuracy = evaluate(model)
            log(f"warm start: step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.3f}")
    meta = {"accuracy": accuracy, "steps": float(step), "seconds": time.monotonic() - start}
    log(f"warm start: done in {meta['seconds']:.0f} s, {step} steps, held-out accuracy {accuracy:.3f}")
    if accuracy < cfg.target_accuracy and step < cfg.max_steps:
        # Stopped by the clock, so not reproducible: not cached, a later run should try again rather than
        # silently reuse a weak start. A start that ran its max_steps is deterministic and is cached.
        log(
            f"warning: warm start stopped below its target accuracy {cfg.target_accuracy:.2f}; "
            "RL from a policy that is never right gets no reward signal"
        )
        return {**meta, "cached": 0.0}
    _store(directory, model, meta)
    return {**meta, "cached": 0.0}


def _load_cached(
    directory: Path, model: torch.nn.Module, log: Callable[[str], None]
) -> dict[str, float] | None:
    """The cached warm start, or None; an unreadable entry (a run killed mid-write before writes were
    atomic, a disk error) is reported and ignored, so it never breaks a later run."""
    if not directory.exists():
        return None
    try:
        meta = json.loads((directory / "meta.json").read_text())
        model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        log(f"warning: warm-start cache {directory} is unreadable ({err}); training it again")
        return None
    log(f"warm start: loaded from cache {directory} (held-out accuracy {meta['accuracy']:.3f})")
    return {**meta, "cached": 1.0}


def _store(directory: Path, model: torch.nn.Module, meta: dict[str, float]) -> None:
    """Written to a temporary sibling and renamed into place: the cache entry is whole or absent."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(model.state_dict(), tmp / "weights.pt")
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(directory, ignore_errors=True)  # an unreadable old entry
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm_start_stage(
    cfg: TrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    splits: tuple[Any, Any],
    log: Callable[[str], None],
) -> dict[str, float]:
    """The supervised warm start as a stage of its own, before the RL loop: trains `model` in place (or
    loads it from the cache), judged by an in-process evaluation stage that is closed afterwards."""
    from cispo.driver.build import build_eval_stage
    from cispo.driver.curriculum import LengthCurriculum

    log(f"warm start: supervised stage until held-out accuracy {cfg.model.warmstart.target_accuracy:.2f}")
    judge = build_eval_stage(cfg, model, tokenizer, splits[1])
    budget = LengthCurriculum(cfg.curriculum, cfg.rollout.max_new_tokens).budget

    def evaluate(m: torch.nn.Module) -> float:
        judge.load_weights(m.state_dict(), 0)
        return judge.evaluate(budget).accuracy

    warm = cfg.model.warmstart
    rows = warm_start_rows(warm.data_path, cfg.data) if warm.data_path else splits[0]
    seed = warm.resolved_seed(cfg.experiment.seed)
    try:
        result = supervised_warmstart(
            model, tokenizer, rows, evaluate, cfg.model, cfg.data, seed, log=log, eval_rows=splits[1]
        )
    finally:
        judge.close()
    return {f"warmstart/{k}": v for k, v in result.items()}


def warm_start_rows(path: str, data_cfg: DataConfig) -> list[dict[str, str]]:
    """The rows of model.warmstart.data_path (JSONL, optionally gzip-compressed): every line a
    {prompt, answer} object (the data config's prompt_key / answer_key), checked line by line."""
    file = resolve_data_file(path, "model.warmstart.data_path")
    rows = []
    for number, row in jsonl_rows(file, "model.warmstart.data_path"):
        missing = [key for key in (data_cfg.prompt_key, data_cfg.answer_key) if key not in row]
        if missing:
            where = f"config error at model.warmstart.data_path: {str(file)!r} line {number}"
            raise ValueError(f"{where}: no {missing[0]!r} field")
        rows.append({"prompt": str(row[data_cfg.prompt_key]), "answer": str(row[data_cfg.answer_key])})
    if not rows:
        raise ValueError(f"config error at model.warmstart.data_path: {str(file)!r} has no rows")
    return rows
