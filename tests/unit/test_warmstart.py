"""The supervised warm start's own options: rows from model.warmstart.data_path, a seed of its own, and
which results are cached (a deterministic stop at max_steps is, a stop by the clock below target is not)."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from cispo.core.config import DataConfig, ModelConfig, WarmstartConfig
from cispo.driver.policy import load_tokenizer
from cispo.driver.warmstart import cache_key, lr_factor, supervised_warmstart, warm_start_rows


class _TinyLM(torch.nn.Module):
    """Just enough of a causal LM for the warm start's loop: forward(input_ids, attention_mask, labels)
    returns an object with a cross-entropy .loss."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask, labels):
        del attention_mask
        logits = self.head(self.embed(input_ids))[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return type("Out", (), {"loss": loss})()


def _write(path: Path, lines: list[str]) -> Path:
    data = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data)
    return path


def test_rows_from_a_file_plain_or_gzip(tmp_path):
    good = [json.dumps({"prompt": "1+2=", "answer": "=3"}), "", json.dumps({"prompt": "4+4=", "answer": 8})]
    for name in ("rows.jsonl", "rows.jsonl.gz"):
        rows = warm_start_rows(str(_write(tmp_path / name, good)), DataConfig())
        assert rows == [{"prompt": "1+2=", "answer": "=3"}, {"prompt": "4+4=", "answer": "8"}]


def test_bad_rows_name_the_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "1+2=", "answer": "3"}), '{"prompt": "x"}'])
    with pytest.raises(ValueError, match=r"warmstart.data_path: '.*bad.jsonl' line 2: no 'answer' field"):
        warm_start_rows(str(bad), DataConfig())
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "1+2=", "answer": "3"}).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl' line 2: not UTF-8 \(byte 0xe9"):
        warm_start_rows(str(latin), DataConfig())
    with pytest.raises(ValueError, match="data_path: no file"):
        warm_start_rows(str(tmp_path / "missing.jsonl"), DataConfig())
    with pytest.raises(ValueError, match="has no rows"):
        warm_start_rows(str(_write(tmp_path / "empty.jsonl", [""])), DataConfig())


def test_seed_must_be_a_seed_or_minus_one():
    assert WarmstartConfig(seed=-1).seed == -1 and WarmstartConfig(seed=3).seed == 3
    with pytest.raises(ValueError, match="model.warmstart.seed"):
        WarmstartConfig(seed=-2)


def test_the_cache_key_follows_the_data_path_and_the_seed():
    model, data = ModelConfig(), DataConfig()
    other = ModelConfig(warmstart=WarmstartConfig(data_path="sft.jsonl"))
    assert cache_key(model, data, 0) != cache_key(other, data, 0)
    assert cache_key(model, data, 0) != cache_key(model, data, 1)


def test_the_cosine_schedule_by_hand_and_constant_keys_unchanged():
    assert [lr_factor("constant", 100, s) for s in (0, 50, 100, 200)] == [1.0, 1.0, 1.0, 1.0]
    # (1 + cos(pi * s / 100)) / 2 at s = 0, 25, 50, 75, 100, and held at 0 past max_steps
    expected = [1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0, 0.0]
    got = [lr_factor("cosine", 100, s) for s in (0, 25, 50, 75, 100, 150)]
    assert got == pytest.approx(expected, abs=1e-12)
    # The key of the default settings as it was before lr_schedule existed: adding the field (at its
    # "constant" default) must not recompute every cached start. Change this value only on purpose.
    assert cache_key(ModelConfig(), DataConfig(), 0) == "53bec987c59e0f52"
    cosine = ModelConfig(warmstart=WarmstartConfig(lr_schedule="cosine"))
    assert cache_key(cosine, DataConfig(), 0) != cache_key(ModelConfig(), DataConfig(), 0)
    with pytest.raises(ValueError, match="model.warmstart.lr_schedule"):
        WarmstartConfig(lr_schedule="linear")


@pytest.mark.parametrize("stop", ["max_steps", "clock"])
def test_only_a_deterministic_stop_below_target_is_cached(tmp_path, stop):
    tokenizer = load_tokenizer("builtin:char")
    warm = WarmstartConfig(
        target_accuracy=1.0,
        max_steps=3 if stop == "max_steps" else 10**6,
        max_time_s=1e9 if stop == "max_steps" else 1e-9,
        batch_size=4,
        eval_every=1,
        cache_dir=str(tmp_path),
    )
    model_cfg, data_cfg = ModelConfig(warmstart=warm), DataConfig()
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]
    torch.manual_seed(0)
    model = _TinyLM(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = supervised_warmstart(
        model, tokenizer, rows, lambda m: 0.0, model_cfg, data_cfg, 0, log=lambda s: None
    )
    entries = list(tmp_path.iterdir())
    if stop == "max_steps":
        assert result["steps"] == 3 and len(entries) == 1 and entries[0].is_dir()
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        torch.manual_seed(0)  # the same initial weights: they are part of the key
        again = _TinyLM(len(tokenizer))
        cached = supervised_warmstart(
            again, tokenizer, rows, lambda m: 0.0, model_cfg, data_cfg, 0, log=print
        )
        assert cached["cached"] == 1.0
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    else:
        assert result["steps"] == 0 and entries == []


def _cached_start(tmp_path, rows, eval_rows=(), data_cfg=None, seed=0) -> float:
    """Runs a 2-step warm start of a seed-0 model and says whether it came from the cache."""
    tokenizer = load_tokenizer("builtin:char")
    warm = WarmstartConfig(
        target_accuracy=1.0, max_steps=2, batch_size=2, eval_every=1, cache_dir=str(tmp_path)
    )
    torch.manual_seed(seed)
    model = _TinyLM(len(tokenizer))
    result = supervised_warmstart(
        model, tokenizer, rows, lambda m: 0.0, ModelConfig(warmstart=warm), data_cfg or DataConfig(), 0,
        log=lambda s: None, eval_rows=eval_rows,
    )  # fmt: skip
    return result["cached"]


def test_the_cache_key_follows_the_contents_not_the_file_name(tmp_path):
    """An edited row, an added row, other held-out rows, other row counts or other initial weights never
    reuse a warm start trained on the old ones; the same inputs do."""
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]
    held_out = [{"prompt": "3+3=", "answer": "6"}]
    assert _cached_start(tmp_path, rows, held_out) == 0.0
    assert _cached_start(tmp_path, rows, held_out) == 1.0
    edited = [rows[0], {"prompt": "2+2=", "answer": "5"}]
    assert _cached_start(tmp_path, edited, held_out) == 0.0
    assert _cached_start(tmp_path, [*rows, rows[0]], held_out) == 0.0
    assert _cached_start(tmp_path, rows, [{"prompt": "3+3=", "answer": "7"}]) == 0.0
    assert _cached_start(tmp_path, rows, held_out, DataConfig(num_train=7)) == 0.0
    assert _cached_start(tmp_path, rows, held_out, seed=1) == 0.0  # other initial weights
    assert _cached_start(tmp_path, rows, held_out) == 1.0
