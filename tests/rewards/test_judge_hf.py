"""The ``hf`` judge backend: a local model directory decoded greedily by the project's hf engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.core.testing import tiny_lm
from rewards import RewardInput, RewardScorer, RewardSpec
from rewards.judges import build_judge_backend

CHAR_TOKENIZER = Path(__file__).resolve().parents[2] / "cispo" / "assets" / "char_tokenizer"


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    model = tiny_lm("qwen2", seed=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("judge")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Argmax decoding with full forwards (no cache), written out by hand."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_hf_judge_decodes_greedily_and_caches(judge_dir: Path, tmp_path: Path) -> None:
    judge = build_judge_backend("hf", model_path=str(judge_dir), max_new_tokens=6, cache_dir=str(tmp_path))
    prompts = ["grade: 2+2=4", "grade: 3*3=9", "grade: 2+2=4"]
    out = judge.generate(prompts)
    assert out[0] == greedy_reference(judge_dir, prompts[0], 6)
    assert out[1] == greedy_reference(judge_dir, prompts[1], 6) and out[0] != out[1] and len(out[0]) > 2
    assert out[2] == out[0] and judge.stats()["requests"] == 2 and judge.stats()["cache_hits"] == 1
    again = build_judge_backend("hf", model_path=str(judge_dir), max_new_tokens=6, cache_dir=str(tmp_path))
    assert again.generate(prompts[:2]) == out[:2] and again.stats()["requests"] == 0  # from disk, no load


def test_hf_judge_through_the_scorer_counts_unparsable_replies(judge_dir: Path) -> None:
    """A random-init judge writes no verdict: every sample is a counted error, and the run stops."""
    kwargs = {
        "backend": "hf",
        "backend_args": {"model_path": str(judge_dir), "max_new_tokens": 4},
        "template": "{completion}",
    }
    with RewardScorer(
        [RewardSpec("genrm", 1.0, kwargs)], isolation="thread", stop_error_fraction=1.0
    ) as scorer:
        with pytest.raises(Exception, match="failed on 2 of 2 samples") as caught:
            scorer.score([RewardInput("q", "abc"), RewardInput("q", "xyz")])
    assert "JudgeParseError" in str(caught.value) or "no 'Score: N'" in str(caught.value)


def test_hf_judge_bad_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hf judge: model_path .*nope.* is not a directory"):
        build_judge_backend("hf", model_path=str(tmp_path / "nope"))
