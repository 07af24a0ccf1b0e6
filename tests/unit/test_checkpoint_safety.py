"""Checkpoints never execute code and are complete only with a manifest: weights are safetensors, every
other file loads with weights_only=True, and an empty or missing COMPLETE manifest is not a checkpoint."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.driver import checkpoint as ckpt
from cispo.driver.checkpoint import CheckpointError, find_resume_point, load_checkpoint, save_checkpoint
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax


def new_learner(seed: int = 0):
    model, tok = tiny_minimax(seed=seed)
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    return learner, tok


class Payload:
    """Unpickling this with weights_only=False creates `flag`: code run by a checkpoint file."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def reseal(directory: Path) -> None:
    """A manifest that matches the files again: the attack is a well-formed checkpoint, not a damaged one."""
    manifest = json.loads((directory / ckpt.MARKER).read_text())
    manifest["files"] = ckpt._manifest(directory)
    (directory / ckpt.MARKER).write_text(json.dumps(manifest))


def test_save_and_load_round_trip_weights_optimizer_rng_and_state(tmp_path: Path):
    learner, tok = new_learner()
    learner.train_step(make_batch(tok, n=4))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    directory = save_checkpoint(tmp_path, 3, learner, {"last_eval": 0.25, "rng_t": torch.arange(3)}, keep=2)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    fresh, _ = new_learner(seed=1)
    state = load_checkpoint(directory, fresh)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert state["step"] == 3 and state["last_eval"] == 0.25 and torch.equal(state["rng_t"], torch.arange(3))
    assert fresh.version == learner.version == 1
    for name, value in learner.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    a, b = learner.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    assert fresh.scheduler.state_dict()["last_epoch"] == learner.scheduler.state_dict()["last_epoch"]


@pytest.mark.parametrize("planted", ["trainer_state.pt", "optimizer.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path, planted: str):
    learner, _ = new_learner()
    directory = save_checkpoint(tmp_path, 1, learner, {}, keep=2)
    flag = tmp_path / "code_ran"
    state = torch.load(directory / planted, weights_only=True)
    torch.save({**state, "extra": Payload(flag)}, directory / planted)
    reseal(directory)
    assert ckpt.verify_checkpoint(directory) is None  # intact by its manifest: only the loader stands guard
    with pytest.raises((CheckpointError, Exception), match="(?i)weights_only|unpickl|global"):
        load_checkpoint(directory, new_learner(seed=1)[0])
    assert not flag.exists()


def test_an_empty_or_missing_manifest_is_not_a_complete_checkpoint(tmp_path: Path, capsys):
    learner, _ = new_learner()
    older = save_checkpoint(tmp_path, 1, learner, {}, keep=3)
    newer = save_checkpoint(tmp_path, 2, learner, {}, keep=3)
    (newer / ckpt.MARKER).write_text("")  # an emptied marker used to switch verification off
    assert "not complete" in ckpt.verify_checkpoint(newer)
    assert find_resume_point(tmp_path, "auto") == older
    assert "skipping checkpoint step_0000002" in capsys.readouterr().err
    with pytest.raises(ValueError, match="config error at resume: .*not complete"):
        find_resume_point(tmp_path, str(newer))
    with pytest.raises(CheckpointError, match="not complete"):
        load_checkpoint(newer, learner)
    (older / ckpt.MARKER).write_text(json.dumps({"step": 1, "files": {}}))  # lists nothing: proves nothing
    assert find_resume_point(tmp_path, "auto") is None


def test_deepspeed_files_load_with_their_own_classes_and_nothing_else(tmp_path: Path):
    """What DeepSpeed's optimizer-state files hold (a loss scaler, the ZeRO stage enum, fragment addresses)
    loads through safe_load; a file that names any other global is refused without running it."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from cispo.learner.ds_checkpoint import safe_load

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "t": torch.ones(2)}
    state["frag"] = fragment_address(numel=4, start=2)
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = safe_load(tmp_path / "optim_states.pt", "cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["frag"] == fragment_address(numel=4, start=2) and torch.equal(loaded["t"], torch.ones(2))
    flag = tmp_path / "code_ran"
    torch.save({**state, "x": Payload(flag)}, tmp_path / "planted.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        safe_load(tmp_path / "planted.pt", "cpu")
    assert not flag.exists()
