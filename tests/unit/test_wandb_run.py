"""The W&B run as W&B records it: the offline `.wandb` files read back (tests/wandb_records.py) hold the
step axes, the summaries, one row per step, and a resume that never re-logs a step into the same run."""

from pathlib import Path

import pytest

from cispo.core.config import LoggingConfig
from cispo.driver.tracking import Tracker
from cispo.driver.wandb_run import axis_of, device_count
from tests.wandb_records import offline_runs

CONFIG = {"algorithm": {"loss": "cispo"}, "cluster": {"learner_gpus": 2, "rollout_gpus": 2}}


def step_row(step: int) -> dict:
    """A training row as finish_step logs it (eval/accuracy carried forward in every row)."""
    return {
        "reward/mean": step / 10,
        "response_length/p99": 12.0,
        "rollout/samples_generated": 8.0,
        "rollout/new_tokens": 40.0,
        "cispo/loss": 0.5,
        "cispo/clip_frac_high": 0.25,
        "entropy": 1.5,
        "eval/accuracy": 0.25,
        "time/step_s": 0.5,
        "throughput/tokens_per_s": 80.0,
    }


def log_run(tracker: Tracker, steps: range, evals: dict[int, float]) -> None:
    if 0 in steps:
        tracker.log(0, {"eval/accuracy": evals[0], "eval/ran": 1, "parameters": 10.0})
    for step in steps:
        if step == 0:
            continue
        row = step_row(step)
        if step in evals:
            row.update({"eval/accuracy": evals[step], "eval/ran": 1})
        tracker.log(step, row)


def tracker(run_dir: Path, resume_step: int | None = None) -> Tracker:
    cfg = LoggingConfig(wandb="offline", progress=False)
    resumed = resume_step is not None
    return Tracker(cfg, run_dir, "addition", CONFIG, 6, resumed=resumed, resume_step=resume_step)


def test_offline_records_hold_the_step_axes_and_the_summaries(tmp_path):
    t = tracker(tmp_path)
    log_run(t, range(0, 5), {0: 0.25, 2: 0.75, 4: 0.5})
    t.log(4, {"eval/accuracy": 0.5, "eval/ran": 1, "eval/final": 1})  # the final row shares the last step
    t.close()
    [run] = offline_runs(tmp_path / "wandb")
    assert run.steps == [0, 1, 2, 3, 4]  # one row per step: the final evaluation merged into step 4
    assert (
        run.metrics["reward/mean"] == "rollout/step" and run.metrics["response_length/p99"] == "rollout/step"
    )
    assert run.metrics["cispo/loss"] == "train/step" and run.metrics["entropy"] == "train/step"
    assert run.metrics["eval/accuracy"] == "eval/step"
    for axis in ("train/step", "rollout/step", "eval/step", "progress/tokens_seen", "progress/wall_time_s"):
        assert run.metrics[axis] == ""  # an axis of its own
    by_step = {row["_step"]: row for row in run.rows}
    assert [by_step[s].get("eval/step") for s in range(5)] == [0, None, 2, None, 4]
    assert "eval/accuracy" not in by_step[3]  # no stale copy in rows without an evaluation
    assert [by_step[s]["progress/tokens_seen"] for s in range(5)] == [0, 40, 80, 120, 160]
    assert by_step[3]["progress/samples_seen"] == 24 and by_step[4]["progress/wall_time_s"] == 2.0
    assert by_step[3]["throughput/tokens_per_s_per_device"] == 20.0  # 80 tok/s over 4 GPUs
    assert by_step[3]["train/step"] == by_step[3]["rollout/step"] == 3
    assert run.summary["eval/best_accuracy"] == 0.75 and run.summary["eval/best_step"] == 2
    assert run.summary["eval/final_accuracy"] == 0.5 and run.summary["reward/mean"] == 0.4
    assert (tmp_path / "metrics.jsonl").read_text().count('"eval/accuracy": 0.25') == 3  # jsonl as before


def test_resume_after_logged_rows_continues_in_a_new_run_without_losing_any(tmp_path):
    """The interrupted segment logged steps 0..5, its checkpoint is step 3: the resumed segment is a new
    W&B run `<id>-r3` (same group) logging 4..6, with the best evaluation of the kept rows; the first run
    keeps its rows 4..5. A second interruption before the next checkpoint gives `<id>-r3-2`."""
    first = tracker(tmp_path)
    log_run(first, range(0, 6), {0: 0.25, 2: 0.75, 4: 0.875})
    first.close()
    base = (tmp_path / ".wandb_id").read_text().strip()
    second = tracker(tmp_path, resume_step=3)
    log_run(second, range(4, 6), {4: 0.5})
    second.close()
    third = tracker(tmp_path, resume_step=3)
    log_run(third, range(4, 7), {4: 0.5, 6: 0.625})
    third.close()
    runs = offline_runs(tmp_path / "wandb")
    assert [r.run_id for r in runs] == [base, f"{base}-r3", f"{base}-r3-2"]
    assert [r.steps for r in runs] == [[0, 1, 2, 3, 4, 5], [4, 5], [4, 5, 6]]
    assert runs[1].config["cispo_resume"] == {"from_run": base, "from_step": 3}
    assert runs[2].config["cispo_resume"] == {"from_run": f"{base}-r3", "from_step": 3}
    assert {r.group for r in runs} == {f"addition-{tmp_path.name}"}  # one group: the run directory's
    # The best before the checkpoint (0.75 at step 2) carries over; 0.875 at step 4 was superseded.
    assert runs[1].summary["eval/best_accuracy"] == 0.75 and runs[1].summary["eval/best_step"] == 2
    assert runs[2].summary["eval/best_accuracy"] == 0.75
    assert runs[2].rows[-1]["progress/tokens_seen"] == 240  # counted on from the kept rows
    # Stitched at each resume point, the segments give every step exactly once.
    stitched = [s for s in runs[0].steps if s <= 3] + [s for s in runs[2].steps]
    assert stitched == list(range(7))


def test_resume_with_no_rows_after_the_checkpoint_continues_the_same_run(tmp_path):
    first = tracker(tmp_path)
    log_run(first, range(0, 4), {0: 0.25})
    first.close()
    again = tracker(tmp_path, resume_step=3)
    log_run(again, range(4, 6), {})
    again.close()
    runs = offline_runs(tmp_path / "wandb")
    assert len({r.run_id for r in runs}) == 1 and [r.steps for r in runs] == [[0, 1, 2, 3], [4, 5]]


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.summary, self.rows = kwargs, {}, []
        self.entity, self.project = "team", "proj"

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row, step):
        self.rows.append((step, row))

    def finish(self):
        pass


@pytest.mark.parametrize("rewind_works", [True, False])
def test_online_resume_rewinds_to_the_checkpoint_or_falls_back_to_a_new_run(
    monkeypatch, tmp_path, rewind_works
):
    import wandb

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if "resume_from" in kwargs and not rewind_works:
            raise wandb.errors.CommError("rewind is not supported on this server")
        return FakeRun(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    (tmp_path / ".wandb_id").write_text("abc123")
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(6)))
    cfg = LoggingConfig(wandb="online", progress=False, wandb_view=False)
    t = Tracker(cfg, tmp_path, "addition", CONFIG, 6, resumed=True, resume_step=3)
    t.close()
    assert calls[0]["resume_from"] == "abc123?_step=4" and "id" not in calls[0]  # keeps rows 0..3
    if rewind_works:
        assert len(calls) == 1
    else:
        assert calls[1]["id"] == "abc123-r3" and calls[1]["config"]["cispo_resume"]["from_step"] == 3
        assert "rewinding run abc123 to step 3 failed" in (tmp_path / "cli.log").read_text()


def test_artifacts_are_off_by_default_and_logged_when_asked(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "weights.bin").write_bytes(b"\0" * 64)
    for enabled, run_dir in ((False, tmp_path / "off"), (True, tmp_path / "on")):
        cfg = LoggingConfig(wandb="offline", progress=False, wandb_artifacts=enabled)
        t = Tracker(cfg, run_dir, "addition", CONFIG, 2)
        t.log(1, step_row(1))
        t.log_directory(checkpoint, "checkpoint", 1)
        t.close()
        [run] = offline_runs(run_dir / "wandb")
        base = (run_dir / ".wandb_id").read_text().strip()
        if not enabled:
            assert run.artifacts == []
        else:
            [artifact] = run.artifacts
            assert artifact.name == f"{base}-checkpoint" and artifact.type == "checkpoint"
            assert set(artifact.aliases) == {"step-1", "latest"}
            assert [e.path for e in artifact.manifest.contents] == ["weights.bin"]


def test_axes_and_device_count():
    assert axis_of("eval/reward/samples") == "eval/step" and axis_of("reward/errors") == "rollout/step"
    assert axis_of("time/weight_sync_s") == "train/step" and axis_of("actor/grad_norm") == "train/step"
    assert device_count({}) == 1  # a CPU run
    assert device_count({"cluster": {"num_nodes": 2, "gpus_per_node": 8}}) == 16
