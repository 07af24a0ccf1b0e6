"""Reward plugins that hang, crash or raise what cannot be pickled, in worker processes: a hang costs its
timeout per sample, and no process or thread outlives it."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rewards import RewardError, RewardInput, RewardResult, RewardScorer, RewardSpec, register_reward
from rewards.workers import RemoteRewardError

HANG_S = 3600.0


def hang_on_marker(inp: RewardInput) -> float:
    if "HANG" in inp.completion:
        time.sleep(HANG_S)
    if "NAP" in inp.completion:
        time.sleep(2.0)  # for threads, which a timeout abandons but cannot stop
    return 1.0


def hang_with_a_subprocess(inp: RewardInput) -> float:
    child = subprocess.Popen(["sleep", "600"])
    Path(inp.metadata["pid_file"]).write_text(str(child.pid))
    time.sleep(HANG_S)
    return 1.0


def crash_on_marker(inp: RewardInput) -> float:
    if "SEGV" in inp.completion:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if "EXIT" in inp.completion:
        os._exit(3)
    return 1.0


class NeedsTwoArgs(Exception):
    """Pickles but does not unpickle: its args are one message, its __init__ wants two."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raises_unpicklable(inp: RewardInput) -> float:
    if "TWO" in inp.completion:
        raise NeedsTwoArgs("left", "right")
    if "LOCK" in inp.completion:
        raise HoldsALock("locked out")
    return 1.0


def returns_text(inp: RewardInput) -> str:
    return "yes"


@register_reward("test_timeouts_registered_here")
def registered_here(inp: RewardInput) -> RewardResult:
    return RewardResult(0.25, "registered in the driver only")


register_reward("test_timeouts_lambda")(lambda inp: 1.0)


def _inputs(*completions: str) -> list[RewardInput]:
    return [RewardInput("q", c, reference="4") for c in completions]


def _descendants() -> set[int]:
    """Live (not zombie) descendant processes of this one: psutil, or /proc without it."""
    try:
        import psutil
    except ImportError:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except (OSError, ValueError):
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if entry.name.isdigit() and fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
        found, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found
    live = psutil.Process().children(recursive=True)
    return {p.pid for p in live if _status(p) not in ("zombie", "dead")}


def _status(process: object) -> str:
    try:
        return process.status()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - gone between listing and asking
        return "dead"


def _os_threads() -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith("Threads:")).split()[1])


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module", autouse=True)
def _server_running() -> None:
    # The first scorer starts multiprocessing's fork server (and its resource tracker): children of this
    # process that belong to no scorer, so the baseline of each count below is taken after it.
    RewardScorer([RewardSpec(f"{__name__}:hang_on_marker")], max_workers=1).close()


def test_a_hanging_plugin_costs_its_timeout_per_sample_and_leaks_nothing() -> None:
    timeout, samples, workers = 0.5, 6, 2
    baseline, threads, os_threads = _descendants(), threading.active_count(), _os_threads()
    # stop_error_fraction=inf: a call whose samples all time out would stop the run; this test counts them
    spec = RewardSpec(f"{__name__}:hang_on_marker")
    scorer = RewardScorer([spec], timeout_s=timeout, max_workers=workers, stop_error_fraction=math.inf)
    first = set(scorer.worker_pids())
    start = time.monotonic()
    out = scorer.score(_inputs(*["HANG"] * samples))
    elapsed = time.monotonic() - start
    assert [r.score for r in out] == [0.0] * samples
    assert all("timeout after 0.5s" in r.reason for r in out)
    assert scorer.metrics()["reward/timeouts"] == samples
    assert elapsed < timeout * math.ceil(samples / workers) + 20.0  # not stalled on any hang
    assert elapsed < HANG_S
    live = set(scorer.worker_pids())
    assert len(live) == workers and not live & first and _descendants() - baseline == live
    assert all(_gone(pid) for pid in first)
    # Twice the timeouts, the same threads: nothing is left running per timeout.
    assert [r.score for r in scorer.score(_inputs("HANG", "ok", "HANG", "ok"))] == [0.0, 1.0, 0.0, 1.0]
    assert threading.active_count() <= threads and _os_threads() <= os_threads
    assert len(_descendants() - baseline) == workers
    scorer.close()
    assert _descendants() - baseline == set()


def test_hangs_inside_a_batch_do_not_lose_the_samples_queued_behind_them() -> None:
    with RewardScorer([RewardSpec(f"{__name__}:hang_on_marker")], timeout_s=0.5, max_workers=1) as scorer:
        out = scorer.score(_inputs("HANG", "ok", "ok", "HANG", "ok", "ok", "ok", "ok"))
        assert [r.score for r in out] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
        metrics = scorer.metrics()
        assert metrics["reward/timeouts"] == 2.0 and metrics["reward/errors"] == 0.0


def test_a_timeout_kills_the_plugins_own_subprocesses(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    spec = RewardSpec(f"{__name__}:hang_with_a_subprocess")
    with RewardScorer([spec], timeout_s=1.0, max_workers=1, stop_error_fraction=math.inf) as s:
        out = s.score([RewardInput("q", "a", "4", {"pid_file": str(pid_file)})])
    assert "timeout" in out[0].reason
    assert _gone(int(pid_file.read_text()))


@pytest.mark.parametrize(("marker", "how"), [("SEGV", "signal SIGSEGV"), ("EXIT", "exit code 3")])
def test_a_crashing_plugin_fails_its_sample_only_and_its_worker_is_replaced(marker: str, how: str) -> None:
    baseline = _descendants()
    with RewardScorer([RewardSpec(f"{__name__}:crash_on_marker")], max_workers=1) as scorer:
        before = set(scorer.worker_pids())
        out = scorer.score(_inputs("ok", marker, "ok", "ok", "ok", "ok"))
        assert [r.score for r in out] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
        assert f"error WorkerDied: the reward worker process died ({how})" in out[1].reason
        assert scorer.metrics()["reward/errors"] == 1.0
        after = set(scorer.worker_pids())
        assert len(after) == 1 and after != before and _descendants() - baseline == after
    strict = RewardScorer([RewardSpec(f"{__name__}:crash_on_marker")], strict=True, max_workers=1)
    with strict, pytest.raises(RewardError, match=r"crash_on_marker' failed on sample 1: WorkerDied"):
        strict.score(_inputs("ok", marker))


def test_exceptions_that_cannot_be_pickled_are_reported_by_type_message_and_traceback() -> None:
    with RewardScorer([RewardSpec(f"{__name__}:raises_unpicklable")]) as scorer:
        out = scorer.score(_inputs("TWO", "LOCK", "ok"))
        assert [r.score for r in out] == [0.0, 0.0, 1.0]
        assert "error NeedsTwoArgs: left/right" in out[0].reason
        assert "error HoldsALock: locked out" in out[1].reason
        with pytest.raises(RewardError) as err:
            scorer.score(_inputs("LOCK"))
    message = str(err.value)
    assert "failed on 1 of 1 samples" in message and 'raise HoldsALock("locked out")' in message
    assert "HoldsALock: locked out" in message and isinstance(err.value.__cause__, RemoteRewardError)
    strict = RewardScorer([RewardSpec(f"{__name__}:raises_unpicklable")], strict=True)
    with strict, pytest.raises(RewardError, match=r"failed on sample 1: NeedsTwoArgs\('left/right'\)"):
        strict.score(_inputs("ok", "TWO"))


def test_strict_mode_raises_on_a_hang() -> None:
    with RewardScorer([RewardSpec(f"{__name__}:hang_on_marker")], timeout_s=0.5, strict=True) as scorer:
        with pytest.raises(RewardError, match="timed out after 0.5s on sample 1"):
            scorer.score(_inputs("ok", "HANG"))
        assert [r.score for r in scorer.score(_inputs("ok"))] == [1.0]  # the pool still works


def test_unpicklable_metadata_fails_its_sample_naming_the_key() -> None:
    inputs = _inputs("4", "4")
    inputs[1].metadata["rows"] = (row for row in range(3))
    with RewardScorer([RewardSpec("exact_match")]) as scorer:
        out = scorer.score(inputs)
    assert out[0].score == 1.0 and out[1].score == 0.0
    assert "RewardInput.metadata['rows'] (generator) cannot be sent to a reward worker" in out[1].reason


def test_the_result_contract_is_checked_in_the_worker() -> None:
    with RewardScorer([RewardSpec(f"{__name__}:returns_text")]) as scorer:
        with pytest.raises(RewardError, match="returned str; expected float or RewardResult"):
            scorer.score(_inputs("a"))


def test_names_registered_only_in_the_driver() -> None:
    with RewardScorer([RewardSpec("test_timeouts_registered_here")]) as scorer:
        assert scorer.score(_inputs("a"))[0] == RewardResult(0.25, "registered in the driver only")
    with pytest.raises(RewardError, match="reward.isolation=thread"):
        RewardScorer([RewardSpec("test_timeouts_lambda")])
    with RewardScorer([RewardSpec("test_timeouts_lambda")], isolation="thread") as scorer:
        assert scorer.score(_inputs("a"))[0].score == 1.0


def test_close_stops_the_workers_and_score_afterwards_raises() -> None:
    baseline = _descendants()
    scorer = RewardScorer([RewardSpec("exact_match")], max_workers=2)
    assert len(_descendants() - baseline) == 2
    scorer.close()
    scorer.close()
    assert _descendants() - baseline == set()
    with pytest.raises(RuntimeError, match="after close"):
        scorer.score(_inputs("4"))


def test_thread_isolation_keeps_the_old_behaviour() -> None:
    with pytest.raises(ValueError, match="isolation must be one of"):
        RewardScorer([RewardSpec("exact_match")], isolation="fork")
    spec = RewardSpec(f"{__name__}:hang_on_marker")
    with RewardScorer([spec], timeout_s=0.3, isolation="thread") as scorer:
        out = scorer.score(_inputs("NAP", "ok", "ok"))
        assert [r.score for r in out] == [0.0, 1.0, 1.0] and "timeout" in out[0].reason
