"""A run directory holds one branch of checkpoints and its `hf/` is the trained policy: cispo-export says
which step it exports and never replaces a newer export, or another run's, without --force; a fresh run
or a resume from an earlier checkpoint moves the abandoned branch aside, saying so."""

import json
from pathlib import Path

import pytest
import torch

from cispo.driver.checkpoint import claim_branch, complete_checkpoints, read_hf_marker, save_checkpoint
from cispo.driver.export import export_hf, main, policy_dir
from tests.learner.helpers import make_batch, trained_run_dir


@pytest.fixture()
def run(tmp_path: Path):
    """A run dir with policy_init/ and a learner that has made one update."""
    return trained_run_dir(tmp_path)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_export_never_goes_backwards_without_force(run, capsys):
    run_dir, learner = run
    save_checkpoint(run_dir, 2, learner, {}, keep=2, run_id="abc")
    at_two = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.train_step(make_batch(learner.tok, n=4, seed=1))
    # The run ended at step 3: hf/ holds it (written by the run, as the loop does).
    export_hf(learner.state_dict_for_sync(), run_dir / "policy_init", run_dir / "hf", 3, "abc")
    trained = weights(run_dir / "hf")
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds step 3, newer than this checkpoint's step 2" in err and "--force" in err
    assert all(torch.equal(trained[k], v) for k, v in weights(run_dir / "hf").items())  # untouched
    assert main([str(run_dir), "--force"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert read_hf_marker(run_dir / "hf") == {"step": 2, "run_id": "abc"}
    assert all(torch.equal(at_two[k], v) for k, v in weights(run_dir / "hf").items())


def test_export_refuses_another_runs_hf_and_one_it_cannot_date(run, capsys):
    run_dir, learner = run
    save_checkpoint(run_dir, 2, learner, {}, keep=2, run_id="new")
    export_hf(learner.state_dict_for_sync(), run_dir / "policy_init", run_dir / "hf", 1, "old")
    assert main([str(run_dir)]) == 2
    assert "another run" in capsys.readouterr().err
    (run_dir / "hf" / "cispo_export.json").unlink()
    assert main([str(run_dir)]) == 2
    assert "does not say which step" in capsys.readouterr().err
    assert main([str(run_dir), "--out", str(run_dir / "elsewhere")]) == 0  # a new directory is always fine
    assert read_hf_marker(run_dir / "elsewhere") == {"step": 2, "run_id": "new"}


def test_a_fresh_run_moves_the_earlier_branch_aside(run):
    run_dir, learner = run
    for step in (100, 200):
        save_checkpoint(run_dir, step, learner, {}, keep=2, run_id="first")
    export_hf(learner.state_dict_for_sync(), run_dir / "policy_init", run_dir / "hf", 200, "first")
    (run_dir / "metrics.jsonl").write_text('{"step": 200}\n')
    run_id, said = claim_branch(run_dir, None)
    assert run_id != "first" and complete_checkpoints(run_dir) == [] and not (run_dir / "hf").exists()
    assert len(said) == 1 and "fresh run" in said[0]
    assert "moved step_0000100, step_0000200, hf, metrics.jsonl to" in said[0]
    assert not (run_dir / "metrics.jsonl").exists() and (run_dir / "policy_init").is_dir()
    moved = next((run_dir / "discarded").iterdir())
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["step_0000100", "step_0000200"]
    assert (moved / "metrics.jsonl").read_text() == '{"step": 200}\n'
    assert read_hf_marker(moved / "hf") == {"step": 200, "run_id": "first"}


def test_resume_from_an_earlier_checkpoint_discards_the_later_branch(run):
    run_dir, learner = run
    for step in (3, 6, 9):
        save_checkpoint(run_dir, step, learner, {}, keep=0, run_id="r1")
    export_hf(learner.state_dict_for_sync(), run_dir / "policy_init", run_dir / "hf", 9, "r1")
    earlier = run_dir / "checkpoints" / "step_0000003"
    (run_dir / "metrics.jsonl").write_text('{"step": 9}\n')  # a resume keeps it: the tracker cuts it back
    run_id, said = claim_branch(run_dir, earlier)
    assert (
        run_id == "r1" and complete_checkpoints(run_dir) == [earlier] and (run_dir / "metrics.jsonl").exists()
    )
    assert (
        "resume from step_0000003: discarding the later branch: moved step_0000006, step_0000009, hf"
        in said[0]
    )
    assert claim_branch(run_dir, earlier) == ("r1", [])  # nothing left off the branch: nothing said


def test_resume_auto_keeps_everything(run):
    run_dir, learner = run
    save_checkpoint(run_dir, 3, learner, {}, keep=0, run_id="r1")
    export_hf(learner.state_dict_for_sync(), run_dir / "policy_init", run_dir / "hf", 3, "r1")
    assert claim_branch(run_dir, complete_checkpoints(run_dir)[-1]) == ("r1", [])
    assert (run_dir / "hf").is_dir()


def test_a_run_directory_means_its_hf_policy(tmp_path: Path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({}))
    assert policy_dir(tmp_path) == tmp_path / "hf"
    assert policy_dir(tmp_path / "hf") == tmp_path / "hf"
    assert policy_dir(Path("tiny_minimax")) == Path("tiny_minimax")


@pytest.mark.parametrize("keep_best", [False, True])
def test_keep_best_keeps_the_best_held_out_checkpoint_too(run, keep_best: bool):
    run_dir, learner = run
    for step, accuracy in [(1, 0.2), (2, 0.9), (3, 0.3), (4, float("nan"))]:  # step 4: no eval at its step
        save_checkpoint(run_dir, step, learner, {}, keep=1, eval_accuracy=accuracy, keep_best=keep_best)
    names = [p.name for p in complete_checkpoints(run_dir)]
    assert names == (["step_0000002", "step_0000004"] if keep_best else ["step_0000004"])
    manifest = json.loads((run_dir / "checkpoints" / "step_0000004" / "COMPLETE").read_text())
    assert manifest["eval_accuracy"] is None  # strict JSON: no NaN in a manifest
