"""A user's policy loss named by dotted path (defined in a test module, registered nowhere) is the loss the
learners train with: in this process for the torch learner, and inside every rank process for DeepSpeed
(each rank resolves the same string itself)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax
from tests.plugins.user_plugins import LOSS_SCALE

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))

USER_LOSS = "tests.plugins.user_plugins:scaled_cispo_loss"
LOSS_ATOL = 1e-6  # ranks only change the fp32 summation order (see test_deepspeed_learner.py)


def learner_cfg(num_ranks: int = 1) -> LearnerConfig:
    # 18 tokens per micro-batch: each rank runs several micro-batches (as in test_deepspeed_learner.py).
    return LearnerConfig(
        lr=1e-2, warmup_steps=0, num_threads=1, zero_stage=2, num_ranks=num_ranks, micro_batch_tokens=18
    )


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 8)
    plain = build_learner(
        "torch", model=copy.deepcopy(model), cfg=learner_cfg(), algorithm=AlgorithmConfig(loss="cispo")
    )
    return {"model": model, "batch": batch, "plain": plain.train_step(batch).metrics}


def test_torch_learner_resolves_the_dotted_path(setup):
    learner = build_learner(
        "torch",
        model=copy.deepcopy(setup["model"]),
        cfg=learner_cfg(),
        algorithm=AlgorithmConfig(loss=USER_LOSS),
    )
    metrics = learner.train_step(setup["batch"]).metrics
    assert "user_loss_marker" not in setup["plain"]
    assert metrics["user_loss_marker"] == 1.0
    assert metrics["user_loss_pid_min"] == metrics["user_loss_pid_max"] == os.getpid()
    assert metrics["loss"] == pytest.approx(LOSS_SCALE * setup["plain"]["loss"], abs=LOSS_ATOL)
    assert setup["plain"]["loss"] != pytest.approx(0.0, abs=1e-4)  # so the factor is visible


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_ranks_resolve_the_dotted_path(setup):
    learner = build_learner(
        "deepspeed",
        model=copy.deepcopy(setup["model"]),
        cfg=learner_cfg(num_ranks=2),
        algorithm=AlgorithmConfig(loss=USER_LOSS),
    )
    try:
        rank_pids = {entry["pid"] for entry in learner.placement}
        metrics = learner.train_step(setup["batch"]).metrics
    finally:
        learner.close()
    assert len(rank_pids) == 2 and os.getpid() not in rank_pids
    assert metrics["user_loss_marker"] == 1.0
    # Both rank processes computed the user's loss (min and max over all micro-batches of both ranks).
    assert {metrics["user_loss_pid_min"], metrics["user_loss_pid_max"]} == rank_pids
    assert metrics["loss"] == pytest.approx(LOSS_SCALE * setup["plain"]["loss"], abs=LOSS_ATOL)
