"""The ``openai`` judge backend against a real OpenAI-compatible server: ``cispo-serve`` (the project's hf
engine behind /v1/chat/completions) in its own process on 127.0.0.1, on a tiny model and on SmolLM2."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cispo.core.testing import tiny_lm
from rewards import RewardError, RewardInput, RewardScorer, RewardSpec
from rewards.genrm import GenerativeRewardModel, genrm_reward
from rewards.judges.hf_local import HFJudge
from rewards.judges.openai_compat import OpenAIJudge

CHAR_TOKENIZER = Path(__file__).resolve().parents[2] / "cispo" / "assets" / "char_tokenizer"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def cispo_serve(model: str, log: Path, *args: str, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """``cispo-serve`` on 127.0.0.1 (port 0: the OS picks), its API root once it listens; killed after."""
    cmd = [sys.executable, "-m", "cispo.driver.serve", "--model", model, "--port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s  # a hang guard: the model loads before it listens
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cispo-serve did not start (rc {proc.poll()}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield found.group(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    out = tmp_path_factory.mktemp("tiny-judge")
    tiny_lm("qwen2", seed=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with cispo_serve(str(tiny_dir), log, "--max-new-tokens", "8", "--model-name", "tiny") as url:
        yield url, log


def served(log: Path) -> list[int]:
    """The batch sizes the server ran, in order."""
    return [int(n) for n in re.findall(r"batch of (\d+)", log.read_text())]


def test_completions_match_the_engine_and_are_batched_and_cached(tiny_server, tiny_dir: Path) -> None:
    url, log = tiny_server
    before = sum(served(log))
    judge = OpenAIJudge(url, "tiny", max_tokens=6, max_concurrency=4)
    prompts = ["grade: 2+2=4", "grade: 3*3=9", "grade: 2+2=4", "grade: 1+1=2"]
    replies = judge.generate(prompts)
    local = HFJudge(str(tiny_dir), max_new_tokens=6).generate(prompts)  # the same engine, in this process
    assert replies == local and replies[0] != replies[1] and all(isinstance(r, str) and r for r in replies)
    assert sum(served(log)) - before == 3  # the repeated prompt was asked once
    assert judge.generate(prompts[::-1]) == replies[::-1] and sum(served(log)) - before == 3  # cached
    assert judge.stats() == {"requests": 3, "cache_hits": 5, "retries": 0, "timeouts": 0, "errors": 0}


def test_server_reports_models_and_rejects_bad_requests(tiny_server) -> None:
    url, _ = tiny_server
    with NO_PROXY.open(f"{url}/models", timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    bad = urllib.request.Request(
        f"{url}/chat/completions", json.dumps({"messages": "hi"}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        NO_PROXY.open(bad, timeout=30)
    assert caught.value.code == 400 and "'messages' must be" in caught.value.read().decode()


def test_scorer_judges_through_the_server(tiny_server) -> None:
    """A random-init model writes no verdict: each sample is a counted error, never a silent 0, and a
    judge that gives no verdict on any sample stops the run with its reply."""
    url, log = tiny_server
    args = {"base_url": url, "model": "tiny", "max_tokens": 4, "max_concurrency": 8}
    spec = RewardSpec("genrm", 1.0, {"backend": "openai", "backend_args": args, "template": "{completion}"})
    with RewardScorer([spec, RewardSpec("exact_match", 1.0)], isolation="process", max_workers=1) as scorer:
        with pytest.raises(RewardError, match=r"'genrm' failed on 2 of 2 samples \(0 timed out") as caught:
            scorer.score([RewardInput("q", "abc", "abc"), RewardInput("q", "xyz", "abc")])
    assert "JudgeParseError: genrm: no 'Score: N' in the judge's reply" in str(caught.value)


@pytest.mark.slow
def test_smollm2_judge_over_http(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (the shipped GGUF) as a YES/NO judge: real replies, parsed, by the scorer."""
    with cispo_serve("smollm2_gguf", tmp_path / "serve.log", "--model-name", "smollm2") as url:
        args = {"base_url": url, "model": "smollm2", "max_tokens": 8, "timeout_s": 300, "max_concurrency": 4}
        kwargs = {"backend": "openai", "backend_args": args, "parser": "yes_no"}
        inputs = [
            RewardInput("What is 2+2?", "2+2 = 4. The answer is 4.", "4"),
            RewardInput("What is the capital of France?", "Paris", "Paris"),
            RewardInput("What is 2+2?", "The answer is 5.", "4"),
        ]
        with RewardScorer([RewardSpec("genrm", 1.0, kwargs)], isolation="thread") as scorer:
            results = scorer.score(inputs)
            metrics = scorer.metrics()
        judge = genrm_reward.judge(**kwargs)
        replies = judge.generate([judge.judge_prompt(x) for x in inputs])  # from the cache now
    assert metrics["reward/errors"] == 0.0 and metrics["reward/timeouts"] == 0.0
    assert all(isinstance(r, str) and re.match(r"\s*(yes|no)\b", r, re.IGNORECASE) for r in replies), replies
    expected = [GenerativeRewardModel(lambda p: [], parser="yes_no").parse(r).score for r in replies]
    assert [r.score for r in results] == expected
    assert len(served(tmp_path / "serve.log")) >= 1 and sum(served(tmp_path / "serve.log")) == 3
