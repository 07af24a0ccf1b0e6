"""Tiny models and batches shared by the learner tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig, ModelConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import Sample, TrainBatch
from cispo.driver.batch import build_train_batch
from cispo.driver.policy import build_policy, load_tokenizer

TINY_ARCH = {"hidden_size": 32, "intermediate_size": 32, "head_dim": 8}


def tiny_minimax(seed: int = 0):
    tok = load_tokenizer("builtin:char")
    return build_policy(ModelConfig(arch=TINY_ARCH), tok, seed=seed), tok


def tiny_dense(seed: int = 0, vocab: int = 100):
    return tiny_lm(
        "qwen2", seed, vocab_size=vocab, hidden_size=32, intermediate_size=64, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip


def make_batch(tok, n: int = 8, seed: int = 0) -> TrainBatch:
    """n rows, 2 groups, prompts of 6-7 tokens and responses of 2-7 tokens (so rows need padding)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = tok(f"{10 + i}+{20 + 3 * i}=")["input_ids"]
        length = 2 + (i * 5) % 6
        samples.append(
            Sample(
                group_index=i % 2,
                prompt_ids=prompt,
                response_ids=torch.randint(4, 20, (length,), generator=gen).tolist(),
                behaviour_logprobs=(-0.5 - torch.rand(length, generator=gen) * 3).tolist(),
                finish_reason="eos",
                policy_version=0,
            )
        )
    return build_train_batch(samples, torch.randn(n, generator=gen), pad_token_id=0)


def trained_run_dir(tmp_path: Path) -> tuple[Path, Any]:
    """A run directory with policy_init/ (tiny MiniMax and its tokenizer) and a torch learner one update
    past it (`learner.tok`: the tokenizer)."""
    from cispo.learner import build_learner

    model, tok = tiny_minimax()
    model.save_pretrained(tmp_path / "policy_init")
    tok.save_pretrained(tmp_path / "policy_init")
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    learner.train_step(make_batch(tok, n=4))
    learner.tok = tok
    return tmp_path, learner
