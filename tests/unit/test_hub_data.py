"""data.source=hub (issue #28 item 2): local directories laid out as on the hub (config subdirectories,
parquet and JSONL shards), save_to_disk directories, split names, num_train/num_eval, column mapping,
answer extractors, clear errors for bad rows, a missing split and a hub id with no local copy; and the
GSM8K / MATH presets over the samples the package ships."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest

from cispo.core.answers import ANSWER_EXTRACTORS, after_hashes, last_boxed
from cispo.core.config import DataConfig
from cispo.driver.data import load_split, load_splits

REPO = Path(__file__).resolve().parents[2]
GSM = {"prompt_key": "question", "answer_key": "answer", "answer_extractor": "gsm8k"}


def gsm_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"question": f"q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(start, start + n)
    ]


def hub_dir(root: Path, splits: dict[str, list[dict]], config: str = "main") -> Path:
    """A directory laid out as the hub's openai/gsm8k: <config>/<split>-00000-of-00001.parquet."""
    for split, rows in splits.items():
        (root / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return root


def hub(path: Path, **kw) -> DataConfig:
    return DataConfig(source="hub", path=str(path), **{**GSM, **kw})


def test_extractors_by_hand():
    assert after_hashes("48/2 = 24 clips\n#### 72") == "72"
    assert after_hashes("so #### 1,000 ") == "1000"
    assert after_hashes("no marker 72") is None and after_hashes("#### ") is None
    assert last_boxed(
        r"so $\boxed{\frac{1}{2}}$, not \boxed{3}? No: \boxed{\left( 3, \frac{\pi}{2} \right)}."
    ) == (r"\left( 3, \frac{\pi}{2} \right)")
    assert last_boxed(r"\fbox{7}") == "7" and last_boxed(r"\boxed{a\{b\}}") == r"a\{b\}"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None
    assert ANSWER_EXTRACTORS.get("none")("  42 ") == "42"
    with pytest.raises(ValueError, match="config error at data.answer_extractor: unknown answer extractor"):
        DataConfig(answer_extractor="hashes")


def test_a_hub_layout_with_a_config_subdirectory(tmp_path):
    root = hub_dir(tmp_path / "gsm", {"train": gsm_rows(10), "test": gsm_rows(4, start=100)})
    hub_dir(root, {"train": gsm_rows(3, start=500)}, config="socratic")  # another config: never mixed in
    cfg = hub(root, name="main", eval_split="test")
    train, held_out = load_splits(cfg)
    assert train["prompt"] == [f"q{i}?" for i in range(10)]
    assert train["answer"] == [str(i + 1) for i in range(10)]
    assert held_out["answer"] == ["101", "102", "103", "104"] and held_out["line"] == [1, 2, 3, 4]
    # num_train / num_eval: the first rows of each split.
    small = dataclasses.replace(cfg, num_train=3, num_eval=2)
    assert load_split(small, "train")["answer"] == ["1", "2", "3"]
    assert load_split(small, "eval")["answer"] == ["101", "102"]
    other = load_split(dataclasses.replace(cfg, name="socratic", eval_split=""), "train")
    assert other["answer"] == ["501", "502", "503"]


def test_no_eval_split_holds_out_the_last_train_rows(tmp_path):
    root = hub_dir(tmp_path / "gsm", {"train": gsm_rows(10)})
    cfg = hub(root, name="main", num_eval=3)
    # At most a fifth of 10 rows: the last 2 are held out, and training never sees them.
    assert load_split(cfg, "eval")["answer"] == ["9", "10"] and load_split(cfg, "eval")["line"] == [9, 10]
    assert load_split(cfg, "train")["answer"] == [str(i) for i in range(1, 9)]
    assert load_split(dataclasses.replace(cfg, num_train=5), "train")["line"] == [1, 2, 3, 4, 5]


def test_a_missing_split_names_the_key_and_the_splits_there(tmp_path):
    root = hub_dir(tmp_path / "gsm", {"train": gsm_rows(10)})
    with pytest.raises(
        ValueError, match=r"config error at data.eval_split: .* no split 'test' .*'train'.*empty"
    ):
        load_split(hub(root, name="main", eval_split="test"), "eval")
    with pytest.raises(ValueError, match=r"config error at data.split: .* no split 'training'"):
        load_split(hub(root, name="main", split="training"), "train")
    with pytest.raises(ValueError, match=r"config error at data.name: .* no config .*'socratic'.*\['main'\]"):
        load_split(hub(root, name="socratic"), "train")


def test_jsonl_shards_and_the_boxed_extractor(tmp_path):
    root = tmp_path / "math"
    root.mkdir()
    rows = [{"problem": f"What is {i}+{i}?", "solution": f"It is $\\boxed{{{2 * i}}}$."} for i in range(6)]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = DataConfig(
        source="hub",
        path=str(root),
        eval_split="test",
        prompt_key="problem",
        answer_key="solution",
        answer_extractor="boxed",
    )
    train, held_out = load_splits(cfg)
    assert train["answer"] == ["0", "2", "4", "6"] and held_out["answer"] == ["8", "10"]
    assert held_out["prompt"] == ["What is 4+4?", "What is 5+5?"]


def test_save_to_disk_directories(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(gsm_rows(5)),
            "validation": datasets.Dataset.from_list(gsm_rows(2)),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    cfg = hub(tmp_path / "dict", eval_split="validation")
    assert load_split(cfg, "train")["answer"] == ["1", "2", "3", "4", "5"]
    assert load_split(cfg, "eval")["answer"] == ["1", "2"]
    with pytest.raises(
        ValueError, match=r"data.eval_split: .* no split 'test' \(it has \['train', 'validation'\]\)"
    ):
        load_split(hub(tmp_path / "dict", eval_split="test"), "eval")
    datasets.Dataset.from_list(gsm_rows(10)).save_to_disk(str(tmp_path / "one"))
    one = hub(tmp_path / "one", num_eval=1)  # one Dataset: data.split is it, the held-out rows its last
    assert load_split(one, "eval")["answer"] == ["10"] and len(load_split(one, "train")) == 9


def test_a_hub_id_with_no_local_copy_is_one_error_naming_data_path(monkeypatch):
    import huggingface_hub.constants

    # Offline (as with HF_HUB_OFFLINE=1): no network is tried, and nothing is cached under this id.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="hub", path="cispo-tests/no-such-dataset", name="main", **GSM)
    with pytest.raises(ValueError) as caught:
        load_split(cfg, "train")
    message = str(caught.value)
    assert message.startswith(
        "config error at data.path: 'cispo-tests/no-such-dataset' is no local directory"
    )
    assert "save_to_disk" in message and "\n" not in message


def test_bad_rows_name_the_row_and_the_column(tmp_path):
    def fails(rows: list[dict], match: str, **kw) -> None:
        root = hub_dir(tmp_path / f"d{len(list(tmp_path.iterdir()))}", {"train": rows})
        with pytest.raises(ValueError, match=match):
            load_split(hub(root, name="main", **kw), "train")

    rows = gsm_rows(3)
    fails(
        [*rows[:2], {"question": "q?", "answer": "no marker"}],
        r"row 3: data.answer_extractor=gsm8k found no "
        r"answer in field 'answer': 'no marker'",
    )
    fails([*rows, {"question": None, "answer": "#### 4"}], r"row 4 has no usable 'question' field")
    fails(
        rows, r"row 1 has no usable 'problem' field \(keys: \['answer', 'question'\]\)", prompt_key="problem"
    )
    numbers = [{"question": 7, "answer": "#### 1"}]
    fails(numbers, r"row 1: field 'question' must be a string, got int")
    fails(
        [{"question": "q", "answer": 3}], r"field 'answer' must be a string for data.answer_extractor=gsm8k"
    )
    # The message names the data and the split the row is from.
    fails(
        [*rows[:1], {"question": "", "answer": "#### 2"}],
        r"^config error at data.path: '.*' \(hub, train rows, "
        r"from split 'train'\) row 2 has no usable 'question'",
    )


def test_a_jsonl_file_with_its_own_held_out_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm_rows(5)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm_rows(3, start=50)))
    cfg = DataConfig(
        source="jsonl",
        path=str(tmp_path / "train.jsonl"),
        eval_path=str(tmp_path / "eval.jsonl"),
        num_eval=2,
        **GSM,
    )
    assert load_split(cfg, "train")["answer"] == ["1", "2", "3", "4", "5"]  # all of it: none held out
    assert load_split(cfg, "eval")["answer"] == ["51", "52"]


@pytest.mark.parametrize("preset", ["gsm8k", "math"])
def test_the_presets_load_the_shipped_samples_from_any_directory(preset, tmp_path, monkeypatch):
    import cispo

    cfg = cispo.compose([f"data={preset}"]).data
    monkeypatch.chdir(tmp_path)  # the shipped sample is found inside the package, not the working directory
    train, held_out = load_splits(cfg)
    assert (len(train), len(held_out)) == (40, 20)
    expected = {"gsm8k": ("72", "18"), "math": ("p - q", "9901")}[preset]
    assert (train[0]["answer"], held_out[0]["answer"]) == expected
    assert train[0]["prompt"].startswith({"gsm8k": "Natalia sold clips", "math": "Define"}[preset])


def test_the_boxed_extractor_gives_every_shipped_math_answer():
    """MATH-500 has the answer in a column of its own: the extractor reads the same from the solution."""
    for split in ("train", "test"):
        lines = (REPO / "cispo/assets/datasets/math" / f"{split}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert [last_boxed(r["solution"]) for r in rows] == [r["answer"] for r in rows]


def test_the_shipped_samples_carry_their_licence():
    for name in ("gsm8k", "math"):
        folder = REPO / "cispo/assets/datasets" / name
        assert (folder / "LICENSE").read_text().startswith("MIT License")
        assert "commit" in (folder / "NOTICE.md").read_text()
