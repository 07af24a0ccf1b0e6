"""Tiny random-init models and a learner-side log-prob recompute for the rollout tests."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from cispo.core.testing import tiny_lm

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

VOCAB = 64


def make_minimax(seed: int = 0) -> torch.nn.Module:
    """The hybrid MiniMax architecture: lightning (linear) and softmax attention layers, 4 experts top-2."""
    return tiny_lm("minimax", seed, vocab_size=VOCAB).eval()


def make_dense(seed: int = 0) -> torch.nn.Module:
    return tiny_lm("qwen2", seed, vocab_size=VOCAB).eval()


@torch.no_grad()
def learner_logprobs(
    model: torch.nn.Module,
    prompt: list[int],
    response: list[int],
    temperature: float = 1.0,
    device: str = "cpu",
) -> torch.Tensor:
    """What a learner computes: one full forward over prompt+response, fp32 log_softmax, no cache."""
    ids = torch.tensor([prompt + response], device=device)
    logits = model(input_ids=ids).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(response, device=device)[:, None]).squeeze(-1)


@torch.no_grad()
def greedy_full_forward(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache): the learner's view of its own weights."""
    ids = list(prompt)
    for _ in range(num_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="session")
def dense_model() -> torch.nn.Module:
    return make_dense()


@pytest.fixture(scope="session")
def minimax_model() -> torch.nn.Module:
    return make_minimax()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (or the one already running). 4 schedulable CPUs, threads stay
    capped per worker: a module's shared manager holds 2 workers while a test builds a second manager."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray_rollout_"))
    yield
    ray.shutdown()
