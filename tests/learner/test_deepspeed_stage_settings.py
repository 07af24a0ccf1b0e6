"""The DeepSpeed learner's typed seams over 2 CPU ranks (slow: ~1 min): one StageSettings, pickled to every
rank, changes its update exactly as it changes the torch learner's; HF export by `save_hf` with the driver's
marker; the facade is its own weight source and lists its ranks' placement."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.stage import StageSettings
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax

pytestmark = pytest.mark.slow
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))
ATOL = 1e-6  # ranks change only the fp32 summation order (see test_deepspeed_learner.py)

SETTINGS = StageSettings(
    budget=8,
    lr=1e-3,
    grad_clip=0.5,
    normalizer="sample_token",
    loss_kwargs={"eps_low": 1.0, "eps_high": 2.0},
    temperature=0.8,
)


def learner_cfg() -> LearnerConfig:
    return LearnerConfig(
        lr=1e-2, warmup_steps=0, num_threads=1, zero_stage=2, num_ranks=2, micro_batch_tokens=18
    )


@pytest.mark.timeout(600)
def test_stage_settings_change_both_learners_alike(tmp_path):
    model, tok = tiny_minimax()
    model.save_pretrained(tmp_path / "policy_init")
    tok.save_pretrained(tmp_path / "policy_init")
    algorithm = AlgorithmConfig(loss_kwargs={"eps_low": 1.0, "eps_high": 4.0})
    single = build_learner("torch", model=copy.deepcopy(model), cfg=learner_cfg(), algorithm=algorithm)
    ranked = build_learner("deepspeed", model=copy.deepcopy(model), cfg=learner_cfg(), algorithm=algorithm)
    try:
        assert ranked.weight_source() is ranked
        assert [e["rank"] for e in ranked.placement] == [0, 1]
        assert os.getpid() not in {e["pid"] for e in ranked.placement}
        batch = make_batch(tok, n=8)
        before = {k: v.clone() for k, v in single.state_dict_for_sync().items()}
        for learner in (single, ranked):
            learner.apply_settings(SETTINGS)
        # At the stage's temperature on both sides; every ratio far above 1 + eps_high.
        at_stage = single.compute_logprobs(batch)
        assert torch.allclose(ranked.compute_logprobs(batch), at_stage, atol=1e-5)
        batch.old_logprobs = (at_stage - 10.0) * batch.response_mask
        one, two = single.train_step(batch).metrics, ranked.train_step(batch).metrics
        assert two["loss"] == pytest.approx(one["loss"], abs=ATOL)
        assert one["is_weight_max"] == two["is_weight_max"] == pytest.approx(3.0)  # 1 + the stage's eps_high
        assert one["lr"] == two["lr"] == pytest.approx(1e-3)
        after = ranked.state_dict_for_sync()
        mine = single.state_dict_for_sync()
        assert all(torch.allclose(after[k], mine[k], atol=ATOL) for k in mine)
        # AdamW's first step moves each weight with a gradient by lr * sign(g): the stage's 1e-3.
        assert max((after[k] - before[k]).abs().max().item() for k in before) == pytest.approx(1e-3, rel=1e-4)

        marker = {"cispo_export.json": json.dumps({"step": 1, "run_id": "r"})}
        ranked.save_hf(tmp_path / "policy_init", tmp_path / "hf", marker)
        assert json.loads((tmp_path / "hf" / "cispo_export.json").read_text()) == {"step": 1, "run_id": "r"}
        saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
        assert saved and all(torch.allclose(saved[k], after[k], atol=0) for k in saved)
        assert not (tmp_path / "hf.tmp").exists()
    finally:
        ranked.close()
