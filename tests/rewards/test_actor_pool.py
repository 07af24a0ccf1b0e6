"""The Ray reward actor pool: order and identity kept, the same results and metrics as the in-driver scorer,
a dead or frozen actor replaced with its chunk scored once more and taken once, a crash loop stopped.

The plugins below are loaded by dotted path in the actors. Each scored sample appends its index to a log
file (O_APPEND, one short line per call), so a test counts how often every sample was scored to the end.
A plugin that kills or freezes its actor does so before logging, and only the first time (a flag file),
on the first sample of its chunk (one worker thread per actor: a chunk is scored in order), so in the log
every sample appears exactly once when nothing was scored twice.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from cispo.core.config import RewardConfig, TrainConfig
from rewards import RewardError, RewardInput, RewardResult, RewardScorer, RewardSpec

ray = pytest.importorskip("ray")
from rewards.actor_pool import RewardActorPool  # noqa: E402 - after the importorskip

HERE = __name__
slow = pytest.mark.slow


def _log(inp: RewardInput) -> int:
    i = int(inp.metadata["i"])
    if "log" in inp.metadata:
        with open(inp.metadata["log"], "a") as f:
            f.write(f"{i} {os.getpid()} {time.monotonic():.3f}\n")
    return i


def _first_time(inp: RewardInput, flag_key: str) -> bool:
    """True once per flag file: the first call on a sample marked with `flag_key` in its metadata."""
    flag = inp.metadata.get(flag_key)
    if not flag:
        return False
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def half_penalty(inp: RewardInput) -> float:
    return -0.5


def by_index(inp: RewardInput) -> RewardResult:
    """Score i/100, and the reason says which sample, which process, and its thread setting."""
    i = _log(inp)
    return RewardResult(i / 100, f"i={i} pid={os.getpid()} threads={os.environ.get('OMP_NUM_THREADS')}")


def exit_once(inp: RewardInput) -> RewardResult:
    if _first_time(inp, "exit_flag"):
        os._exit(7)  # with isolation=thread this is the actor's own process
    return by_index(inp)


def sleep_once(inp: RewardInput) -> RewardResult:
    if _first_time(inp, "sleep_flag"):
        Path(inp.metadata["started"]).write_text(str(os.getpid()))
        time.sleep(600)
    return by_index(inp)


def freeze_once(inp: RewardInput) -> RewardResult:
    if _first_time(inp, "freeze_flag"):
        Path(inp.metadata["frozen"]).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # the whole actor stops: no thread of it can answer
        time.sleep(3600)  # the stop can land a moment after kill() returns: never score in that moment
    return by_index(inp)


def always_exit(inp: RewardInput) -> RewardResult:
    if inp.metadata.get("die"):
        os._exit(9)
    return by_index(inp)


def raise_on_bad(inp: RewardInput) -> float:
    if "BAD" in inp.completion:
        raise ValueError(f"bad sample {inp.metadata['i']}")
    return 1.0 if inp.completion == inp.reference else 0.0


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray_rw_", dir="/tmp"))
    yield
    ray.shutdown()


def _inputs(n: int, log: Path | None = None, **marks: dict[str, str]) -> list[RewardInput]:
    """n samples, metadata i (and the log); marks: sample index -> extra metadata."""
    out = []
    for i in range(n):
        meta: dict = {"i": i, **({"log": str(log)} if log else {}), **marks.get(f"s{i}", {})}
        out.append(RewardInput("q", str(i % 3), reference="1", metadata=meta))
    return out


def _pool(fn: str, **kwargs) -> RewardActorPool:
    options = {"num_actors": 2, "isolation": "thread", "max_workers": 1, "timeout_s": 30.0, **kwargs}
    return RewardActorPool([RewardSpec(f"{HERE}:{fn}")], **options)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _assert_complete(results: list[RewardResult], n: int, log: Path) -> None:
    assert [r.score for r in results] == [i / 100 for i in range(n)]
    assert [r.reason.split()[0] for r in results] == [f"i={i}" for i in range(n)]
    scored = sorted(int(line.split()[0]) for line in log.read_text().splitlines())
    assert scored == list(range(n)), f"every sample scored to the end exactly once:\n{log.read_text()}"


def test_config_keys_validated() -> None:
    assert RewardConfig().num_actors == 0 and RewardConfig().cpus_per_actor == 1.0
    with pytest.raises(ValueError, match="reward.num_actors"):
        RewardConfig(num_actors=-1)
    with pytest.raises(ValueError, match="reward.cpus_per_actor"):
        RewardConfig(cpus_per_actor=0)


@slow
def test_order_and_identity_with_two_actors(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with _pool("by_index", chunk_size=3, threads_per_actor=3) as pool:
        results = pool.score(_inputs(20, log))
        _assert_complete(results, 20, log)
        pids = {r.reason.split()[1] for r in results}
        assert pids == {f"pid={pid}" for _, pid in pool.actors()}, "both actors scored"
        assert {r.reason.split()[2] for r in results} == {"threads=3"}, "explicit thread count"
        assert pool.score([]) == []
        metrics = pool.metrics()
        assert metrics["reward/samples"] == 20.0
        assert metrics["reward/by_index/mean"] == pytest.approx(sum(range(20)) / 100 / 20)


@slow
def test_same_results_and_metrics_as_the_in_driver_scorer() -> None:
    specs = [
        RewardSpec("exact_match", 1.0, {"extract": "none"}),
        RewardSpec(f"{HERE}:raise_on_bad", 0.5),
        RewardSpec(
            f"{HERE}:half_penalty", 1.0, low=-1.0, high=0.0
        ),  # the configured range reaches the actors
    ]
    inputs = _inputs(11)
    inputs[4] = RewardInput("q", "BAD", reference="1", metadata={"i": 4})
    options = {"timeout_s": 30.0, "max_workers": 2, "isolation": "process"}
    with RewardScorer(specs, **options) as scorer:
        want, want_metrics = scorer.score(inputs), scorer.metrics()
    with RewardActorPool(specs, num_actors=2, chunk_size=4, **options) as pool:
        got, got_metrics = pool.score(inputs), pool.metrics()
    assert got == want
    assert want[4].reason.startswith("exact_match: different answer; ") and "ValueError" in want[4].reason
    assert got_metrics.pop("reward/actor_restarts") == got_metrics.pop("reward/actor_timeouts") == 0.0
    assert got_metrics == pytest.approx(want_metrics) and set(got_metrics) == set(want_metrics)
    assert want_metrics["reward/errors"] == 1.0 and want_metrics["reward/samples"] == 11.0
    assert want_metrics["reward/half_penalty/mean"] == -0.5


@slow
def test_stop_error_fraction_applies_to_the_whole_call() -> None:
    specs = [RewardSpec(f"{HERE}:raise_on_bad")]
    inputs = _inputs(8)
    for i in (4, 5):
        inputs[i] = RewardInput("q", "BAD", reference="1", metadata={"i": i})
    with RewardActorPool(specs, num_actors=2, chunk_size=2, isolation="thread") as pool:
        results = pool.score(inputs)  # chunk [4, 5] fails whole; the call (2 of 8) does not stop
        assert [r.score for r in results] == [0, 1, 0, 0, 0, 0, 0, 1]
        assert pool.metrics()["reward/errors"] == 2.0
    options = {"num_actors": 2, "chunk_size": 2, "isolation": "thread"}
    with RewardActorPool(specs, **options, stop_error_fraction=0.25) as pool:
        with pytest.raises(RewardError, match=r"failed on 2 of 8 samples .*on sample 4 "):
            pool.score(inputs)


def test_build_scorer_without_actors_is_the_in_driver_scorer() -> None:
    from cispo.driver.build import build_scorers

    default, evaluation = build_scorers(TrainConfig())
    assert isinstance(default, RewardScorer), "reward.num_actors=0: today's in-driver scorer"
    assert isinstance(evaluation, RewardScorer) and evaluation is not default
    default.close()
    evaluation.close()


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60  # ray.kill is asynchronous
    while _alive(pid):
        assert time.monotonic() < deadline, "the actors were never stopped"
        time.sleep(0.1)


@slow
def test_train_and_eval_views_share_the_actors_and_keep_their_own_counters() -> None:
    exact = [RewardSpec("exact_match", kwargs={"extract": "none"})]
    pool = RewardActorPool(exact, num_actors=1, isolation="thread")
    train, evaluation = pool.view("train"), pool.view("eval")
    assert pool.view("eval") is evaluation and train.actors() == evaluation.actors() == pool.actors()
    inputs = [RewardInput("q", "4", reference="4"), RewardInput("q", "5", reference="4")]
    first, second = train.submit(inputs), evaluation.submit(inputs[:1])  # both in flight at once
    third = train.submit(inputs[1:])
    assert [r.score for r in evaluation.result(second)] == [1.0]
    assert evaluation.metrics()["reward/samples"] == 1.0
    assert [r.score for r in train.result(third)] == [0.0]
    # metrics() right after result(h): exactly that call, though `first` finished before it
    assert train.metrics()["reward/samples"] == 1.0 and "reward/samples" not in train.metrics()
    assert [r.score for r in train.result(first)] == [1.0, 0.0]
    assert train.metrics()["reward/exact_match/mean"] == 0.5 and "reward/samples" not in evaluation.metrics()
    with pytest.raises(ValueError, match="already taken"):
        train.result(first)
    with pytest.raises(ValueError, match="another view"):
        evaluation.result(train.submit(inputs))
    train.close()
    actor, pid = evaluation.actors()[0]
    assert ray.get(actor.ready.remote(), timeout=60) == pid, "the actors live while a view is open"
    with pytest.raises(RuntimeError, match="after close"):
        train.submit(inputs)
    evaluation.close()  # the last view: the pool stops its actors
    _wait_gone(pid)
    with pytest.raises(RuntimeError, match="after close"):
        pool.view("train")


@slow
def test_closing_the_pool_stops_the_actors_under_open_views() -> None:
    with RewardActorPool([RewardSpec(f"{HERE}:by_index")], num_actors=1, isolation="thread") as pool:
        view = pool.view("eval")
        [(_, pid)] = pool.actors()
    with pytest.raises(RuntimeError, match="after close"):
        view.submit(_inputs(1))
    _wait_gone(pid)


@slow
def test_an_actor_that_exits_is_replaced_and_its_chunk_scored_once(tmp_path: Path) -> None:
    log, flag = tmp_path / "log", tmp_path / "exit_flag"
    inputs = _inputs(12, log, s4={"exit_flag": str(flag)})  # the first sample of the second chunk
    with _pool("exit_once", chunk_size=4) as pool:
        before = {pid for _, pid in pool.actors()}
        results = pool.score(inputs)
        assert flag.exists(), "the actor did exit"
        _assert_complete(results, 12, log)
        metrics = pool.metrics()
        assert metrics["reward/actor_restarts"] == 1.0 and metrics["reward/actor_timeouts"] == 0.0
        assert metrics["reward/samples"] == 12.0 and metrics["reward/errors"] == 0.0
        assert len({pid for _, pid in pool.actors()} - before) == 1, "one actor is new"


@slow
def test_an_actor_killed_mid_chunk_is_replaced_and_its_chunk_scored_once(tmp_path: Path) -> None:
    log, started = tmp_path / "log", tmp_path / "started"
    # sample 4 opens the second chunk, which submit() sends at once (one chunk per idle actor)
    inputs = _inputs(12, log, s4={"sleep_flag": str(tmp_path / "sleep_flag"), "started": str(started)})
    with _pool("sleep_once", chunk_size=4) as pool:
        handle = pool.submit(inputs)
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline, "the marked sample never started"
            time.sleep(0.05)
        time.sleep(0.2)  # the pid is written
        victim = next(actor for actor, pid in pool.actors() if pid == int(started.read_text()))
        ray.kill(victim, no_restart=True)
        _assert_complete(pool.result(handle), 12, log)
        assert pool.metrics()["reward/actor_restarts"] == 1.0


@slow
def test_a_frozen_actor_is_killed_after_its_deadline_and_replaced(tmp_path: Path) -> None:
    log, frozen = tmp_path / "log", tmp_path / "frozen"
    inputs = _inputs(8, log, s4={"freeze_flag": str(tmp_path / "freeze_flag"), "frozen": str(frozen)})
    pid = None
    try:
        # a chunk of 4 may take grace_s + 4 x timeout_s = 8 s here; the frozen one never answers
        with _pool("freeze_once", chunk_size=4, timeout_s=1.0, grace_s=4.0) as pool:
            start = time.monotonic()
            results = pool.score(inputs)
            elapsed = time.monotonic() - start
            pid = int(frozen.read_text())
            _assert_complete(results, 8, log)
            metrics = pool.metrics()
            assert metrics["reward/actor_timeouts"] == 1.0 and metrics["reward/actor_restarts"] == 1.0
            assert elapsed >= 8.0, "killed only once its deadline passed"
            assert pid not in {p for _, p in pool.actors()}
            deadline = time.monotonic() + 60  # ray.kill is asynchronous (a stopped process: ~5 s)
            while _alive(pid):
                assert time.monotonic() < deadline, "the frozen actor was never killed"
                time.sleep(0.1)
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)  # Ray has killed it; if not, let it run so Ray can
            except ProcessLookupError:
                pass


@slow
def test_a_crash_loop_stops_with_an_error_naming_the_actor(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with _pool("always_exit", num_actors=1, max_restarts=2) as pool:
        assert [r.score for r in pool.score(_inputs(3, log))] == [0.0, 0.01, 0.02]
        spent = r"reward actor slot 0 died: ActorDiedError: .*, and its restart budget is spent: 2 restart"
        with pytest.raises(RuntimeError, match=spent):
            pool.score(_inputs(3, log, s1={"die": "yes"}))
    # the first call's three, then sample 0 before each of the three deaths
    assert sorted(int(line.split()[0]) for line in log.read_text().splitlines()) == [0, 0, 0, 0, 1, 2]
