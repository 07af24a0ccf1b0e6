"""Checkpoints that never lie, non-finite updates that are skipped and never saved, a warm-start cache that
is whole or absent."""

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.driver.checkpoint import CheckpointError, find_resume_point, save_checkpoint, verify_checkpoint
from cispo.driver.update import NonFiniteGuard, NonFiniteUpdates
from cispo.driver.warmstart import _load_cached, _store
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax


@pytest.fixture(scope="module")
def learner():
    model, tok = tiny_minimax()
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    learner.tok = tok
    return learner


def test_complete_is_a_manifest_of_sizes_and_checksums(tmp_path: Path, learner):
    directory = save_checkpoint(tmp_path, 1, learner, {"x": 1}, keep=2)
    manifest = json.loads((directory / "COMPLETE").read_text())
    files = {"model.safetensors", "optimizer.pt", "trainer_state.pt"}
    assert manifest["step"] == 1 and set(manifest["files"]) == files
    assert manifest["files"]["model.safetensors"]["size"] == (directory / "model.safetensors").stat().st_size
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert verify_checkpoint(directory) is None
    assert not list(tmp_path.glob("checkpoints/*.partial"))


def test_resume_falls_back_past_a_truncated_file_naming_it(tmp_path: Path, learner, capsys):
    older = save_checkpoint(tmp_path, 1, learner, {}, keep=3)
    newer = save_checkpoint(tmp_path, 2, learner, {}, keep=3)
    with (newer / "model.safetensors").open("r+b") as f:  # a COMPLETE checkpoint whose file was cut short
        f.truncate(100)
    assert find_resume_point(tmp_path, "auto") == older
    assert "skipping checkpoint step_0000002" in capsys.readouterr().err
    assert "model.safetensors has 100 bytes" in verify_checkpoint(newer)
    with pytest.raises(ValueError, match="config error at resume: .*model.safetensors has 100 bytes"):
        find_resume_point(tmp_path, str(newer))
    (older / "trainer_state.pt").write_bytes(b"flipped")
    assert find_resume_point(tmp_path, "auto") is None


class FailingLearner:
    """Saves half its files, then the disk says no."""

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "part.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device", str(Path(directory) / "rest.bin"))


def test_a_failed_write_names_the_path_and_the_error_and_leaves_nothing(tmp_path: Path, learner):
    intact = save_checkpoint(tmp_path, 1, learner, {}, keep=2)
    with pytest.raises(
        CheckpointError, match=r"step_0000002 failed at .*rest.bin: .*No space left on device"
    ):
        save_checkpoint(tmp_path, 2, FailingLearner(), {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    assert verify_checkpoint(intact) is None


def test_a_full_disk_on_a_real_tmpfs(tmp_path: Path, learner):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        first = save_checkpoint(mount, 1, learner, {}, keep=5)  # small; the 12 MB padded ones fill 20 MB
        with pytest.raises(
            CheckpointError, match=rf"{mount}/checkpoints/step_000000\d failed at .*bytes free"
        ):
            for step in range(2, 6):
                save_checkpoint(mount, step, learner, {"pad": torch.zeros(3_000_000)}, keep=5)
        assert not list((mount / "checkpoints").glob("*.partial"))
        assert verify_checkpoint(first) is None
        assert find_resume_point(mount, "auto") is not None
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path):
    model, _ = tiny_minimax()
    broken = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="weights are not finite"):
        save_checkpoint(tmp_path, 1, broken, {}, keep=2)
    assert not (tmp_path / "checkpoints").exists()


def test_a_non_finite_update_is_skipped_and_counted():
    model, tok = tiny_minimax()
    learner = build_learner(
        "torch", model=model, cfg=LearnerConfig(num_threads=1), algorithm=AlgorithmConfig()
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(tok, n=4)
    batch.advantages[0] = float("nan")
    result = learner.train_step(batch)
    assert result.metrics["skipped_frac"] == 1.0 and learner.version == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert learner.weights_finite()
    assert learner.train_step(make_batch(tok, n=4)).metrics["skipped_frac"] == 0.0 and learner.version == 1


def test_the_guard_stops_after_n_skipped_updates_in_a_row():
    guard = NonFiniteGuard(limit=3)
    for skipped in (1.0, 1.0, 0.0, 1.0, 1.0):
        guard.observe({"skipped_frac": skipped})
    with pytest.raises(NonFiniteUpdates, match="3 optimizer steps in a row .*learner.max_nonfinite_steps=3"):
        guard.observe({"skipped_frac": 1.0})
    assert guard.total == 5


def test_the_warm_start_cache_is_whole_or_ignored(tmp_path: Path):
    model = tiny_minimax()[0]
    entry = tmp_path / uuid.uuid4().hex
    _store(entry, model, {"accuracy": 0.4, "steps": 10.0, "seconds": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary sibling left
    fresh = tiny_minimax(seed=1)[0]
    assert _load_cached(entry, fresh, print)["cached"] == 1.0
    with (entry / "weights.pt").open("r+b") as f:  # half-written by a run from before atomic writes
        f.truncate(50)
    said = []
    assert _load_cached(entry, fresh, said.append) is None
    assert "is unreadable" in said[0] and str(entry) in said[0]
