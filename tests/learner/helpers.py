"""Tiny models and batches shared by the learner tests."""

from __future__ import annotations

import torch

from cispo.core.config import ModelConfig
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
