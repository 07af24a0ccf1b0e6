"""The ``openai`` judge backend against real HTTP servers on 127.0.0.1 whose failures are scripted: retries,
timeouts, HTTP errors, concurrency, the API key and the cache; and the scorer sending a batch at once."""

from __future__ import annotations

import pytest

from rewards import RewardError, RewardInput, RewardScorer, RewardSpec
from rewards.genrm import GenerativeRewardModel, JudgeParseError, genrm_reward
from rewards.judges import JudgeError, JudgeTimeout, build_judge_backend
from rewards.judges.openai_compat import OpenAIJudge
from tests.rewards.judge_servers import scripted_server


def judge(url: str, **kw: object) -> OpenAIJudge:
    return OpenAIJudge(url, "judge-model", backoff_s=0.01, **kw)  # type: ignore[arg-type]


def test_request_and_reply() -> None:
    with scripted_server(reply=lambda p: f"echo {p[-5:]}") as server:
        out = judge(server.base_url, max_tokens=17, system_prompt="Be strict.").generate(["hello world"])
    assert out == ["echo world"]
    body = server.script.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 17
    assert body["messages"] == [
        {"role": "system", "content": "Be strict."},
        {"role": "user", "content": "hello world"},
    ]


def test_retries_after_dropped_connections() -> None:
    with scripted_server(drop=2) as server:
        j = judge(server.base_url, max_retries=3)
        assert j.generate(["q"]) == ["Judged 1 chars.\nScore: 7"]
    assert server.hits == 3
    assert j.stats() == {"requests": 3, "cache_hits": 0, "retries": 2, "timeouts": 0, "errors": 0}


def test_gives_up_after_max_retries() -> None:
    with scripted_server(drop=10) as server:
        j = judge(server.base_url, max_retries=2)
        [out] = j.generate(["q"])
    assert isinstance(out, JudgeError) and not isinstance(out, TimeoutError)
    assert "failed 3 times" in str(out) and server.hits == 3
    assert j.stats()["errors"] == 1 and j.stats()["retries"] == 2


def test_retryable_status_is_retried_and_client_error_is_not() -> None:
    with scripted_server(fail=1, fail_status=503) as server:
        assert judge(server.base_url).generate(["q"]) == ["Judged 1 chars.\nScore: 7"]
    assert server.hits == 2
    with scripted_server(fail=5, fail_status=400) as server:
        [out] = judge(server.base_url, max_retries=3).generate(["q"])
    assert isinstance(out, JudgeError) and "HTTP 400" in str(out) and "scripted failure" in str(out)
    assert server.hits == 1  # a bad request does not get better by repeating it


def test_timeouts_are_counted_as_timeouts() -> None:
    with scripted_server(sleep_s=30) as server:  # the server wakes when the test closes it
        j = judge(server.base_url, timeout_s=0.5, max_retries=1)
        [out] = j.generate(["q"])
    assert isinstance(out, JudgeTimeout) and isinstance(out, TimeoutError)
    assert "timed out after 0.5s, 2 tries" in str(out)
    assert j.stats()["timeouts"] == 2 and j.stats()["errors"] == 1 and server.hits == 2


def test_batch_requests_go_out_concurrently() -> None:
    # Each request is held until 4 are in flight together: a client sending one at a time gets 500s.
    with scripted_server(barrier=4) as server:
        j = judge(server.base_url, max_concurrency=4, max_retries=0)
        out = j.generate([f"prompt {i}" for i in range(4)])
    assert out == ["Judged 8 chars.\nScore: 7"] * 4 and server.hits == 4


def test_cache_in_memory_and_on_disk(tmp_path) -> None:
    with scripted_server(reply=lambda p: f"Score: {len(p)}") as server:
        j = judge(server.base_url, cache_dir=str(tmp_path / "cache"))
        assert j.generate(["a", "bb", "a"]) == ["Score: 1", "Score: 2", "Score: 1"]
        assert server.hits == 2  # the repeated prompt went out once
        assert j.generate(["bb", "ccc"]) == ["Score: 2", "Score: 3"]
        assert server.hits == 3 and j.stats()["cache_hits"] == 2
        fresh = judge(server.base_url, cache_dir=str(tmp_path / "cache"))  # a new process, same directory
        assert fresh.generate(["ccc", "a", "bb"]) == ["Score: 3", "Score: 1", "Score: 2"]
        assert server.hits == 3 and fresh.stats()["requests"] == 0
        other = OpenAIJudge(server.base_url, "another-model", cache_dir=str(tmp_path / "cache"))
        other.generate(["a"])  # a different request (model) is a different key
        assert server.hits == 4


def test_api_key_is_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CISPO_TEST_JUDGE_KEY", "sk-test-123")
    with scripted_server() as server:
        judge(server.base_url, api_key_env="CISPO_TEST_JUDGE_KEY").generate(["q"])
    assert server.script.headers[0]["Authorization"] == "Bearer sk-test-123"
    monkeypatch.delenv("CISPO_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="CISPO_TEST_JUDGE_KEY"):
        judge("http://127.0.0.1:9/v1", api_key_env="CISPO_TEST_JUDGE_KEY")


def test_bad_backend_config_is_named() -> None:
    with pytest.raises(ValueError, match="base_url"):
        build_judge_backend("openai", base_url="127.0.0.1:8000", model="m")
    with pytest.raises(TypeError, match="judge backend 'openai'.*temprature"):
        build_judge_backend("openai", base_url="http://127.0.0.1:1/v1", model="m", temprature=0)
    with pytest.raises(ValueError, match="unknown judge backend 'vllm-magic'"):
        build_judge_backend("vllm-magic")


def test_genrm_through_the_backend_parses_or_errors() -> None:
    replies = {"good": "Correct.\nScore: 9", "bad": "no verdict here"}
    with scripted_server(reply=lambda p: replies["good" if "right" in p else "bad"]) as server:
        model = GenerativeRewardModel(judge(server.base_url).generate)
        out = model.score_batch([RewardInput("q", "right"), RewardInput("q", "wrong")])
    assert out[0].score == pytest.approx(0.9)  # type: ignore[union-attr]
    assert isinstance(out[1], JudgeParseError) and "no 'Score: N'" in str(out[1])


def test_scorer_sends_the_batch_at_once_and_counts_failures() -> None:
    """The scorer calls score_batch: 4 samples reach the judge together (the barrier), and an unparsable
    reply and a timed-out request are counted as an error and a timeout, never as a silent 0."""

    def reply(prompt: str) -> str:
        return "Score: 10" if "PERFECT" in prompt else "Score: 4" if "OK" in prompt else "I cannot say."

    with scripted_server(barrier=4, reply=reply) as server:
        args = {"base_url": server.base_url, "model": "m", "max_concurrency": 8, "max_retries": 0}
        spec = RewardSpec("genrm", 1.0, {"backend": "openai", "backend_args": args})
        with RewardScorer([spec], isolation="process", max_workers=1) as scorer:
            inputs = [RewardInput("q", c, "r") for c in ("PERFECT", "OK", "hmm", "PERFECT again")]
            results = scorer.score(inputs)
            metrics = scorer.metrics()
    assert [r.score for r in results] == [1.0, 0.4, 0.0, 1.0] and server.hits == 4
    assert "no 'Score: N'" in results[2].reason
    assert metrics["reward/errors"] == 1.0 and metrics["reward/genrm/errors"] == 1.0
    assert metrics["reward/timeouts"] == 0.0

    with scripted_server(sleep_s=30, sleep_when=lambda p: "SLOW" in p) as slow:
        args = {"base_url": slow.base_url, "model": "m", "timeout_s": 0.3, "max_retries": 1}
        spec = RewardSpec("genrm", 1.0, {"backend": "openai", "backend_args": args})
        with RewardScorer([spec], isolation="thread") as scorer:
            results = scorer.score([RewardInput("q", "a"), RewardInput("q", "SLOW"), RewardInput("q", "b")])
            metrics = scorer.metrics()
    assert [r.score for r in results] == [0.7, 0.0, 0.7] and slow.hits == 4  # the slow one tried twice
    assert "genrm: timeout" in results[1].reason and "timed out after 0.3s, 2 tries" in results[1].reason
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/genrm/timeouts"] == 1.0
    assert metrics["reward/errors"] == 0.0

    with scripted_server(sleep_s=30) as slow:
        args = {"base_url": slow.base_url, "model": "m", "timeout_s": 0.3, "max_retries": 0}
        spec = RewardSpec("genrm", 1.0, {"backend": "openai", "backend_args": args})
        with RewardScorer([spec], isolation="thread") as scorer:
            with pytest.raises(RewardError, match=r"failed on 2 of 2 samples \(2 timed out") as caught:
                scorer.score([RewardInput("q", "a"), RewardInput("q", "b")])
    assert "timed out after 0.3s" in str(caught.value) and slow.hits == 2


def test_genrm_needs_exactly_one_judge() -> None:
    with pytest.raises(ValueError, match="exactly one of 'backend'"):
        genrm_reward(RewardInput("q", "a"))
    with pytest.raises(ValueError, match="exactly one of 'backend'"):
        genrm_reward(RewardInput("q", "a"), backend="openai", generate="x:y")


def test_shipped_judge_config_scores() -> None:
    """configs/reward/judge.yaml composes, and its kwargs drive a real judge (pointed at a local server)."""
    from hydra import compose, initialize_config_dir

    from cispo.core.config import register_configs
    from cispo.driver.cli import CONFIG_DIR, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = to_train_config(compose(config_name="config", overrides=["reward=judge"]))
    [item] = cfg.reward.rewards
    assert item.name == "genrm" and item.kwargs["backend"] == "openai"
    with scripted_server() as server:
        kwargs = {**item.kwargs, "backend_args": {**item.kwargs["backend_args"], "base_url": server.base_url}}
        with RewardScorer([RewardSpec(item.name, item.weight, kwargs)], isolation="thread") as scorer:
            assert [r.score for r in scorer.score([RewardInput("q", "a"), RewardInput("q", "b")])] == [
                0.7,
                0.7,
            ]
    assert server.hits == 2 and server.script.bodies[0]["max_tokens"] == 512
