"""The generation stream over the in-process backend (rollout.backend=local), without Ray.

- The weight-sync lock: weights published while a job decodes never reach the engine before that job is
  done (the old bug: with the local backend, a sync changed the weights in place mid-decode).
- Partial rollouts: a sequence continues under new weights after a sync; each token keeps the version and
  the behaviour log-prob it was sampled with, so the CISPO weight is exact per token.

Both drive a real hf engine on tiny random models and compare with teacher-forced log-probs (the learner's
view) or with an undisturbed engine given the same seeds.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from cispo.algo.advantages import get_advantage
from cispo.algo.losses import cispo_loss
from cispo.core.config import AlgorithmConfig
from cispo.core.types import Generation, PromptGroup, Sample, SamplingParams
from cispo.driver.update import make_train_batch
from rollout.engine import build_engine
from rollout.hf_engine import HFEngine
from rollout.manager import LocalRolloutManager
from rollout.stream import FinishedGroup, GenerationStream, GroupJob
from rollout.tasks import TaskResult
from tests.rollout.conftest import learner_logprobs, make_dense

pytestmark = pytest.mark.timeout(300)  # a hang guard: a broken lock may leave a job waiting forever

ENGINE = {"max_batch_size": 8, "num_threads": 1}
V0, V1 = make_dense(seed=0), make_dense(seed=5)


def _groups() -> list[PromptGroup]:
    # Equal-length prompts: no padding, so the engine's cached decode matches a full forward exactly.
    return [
        PromptGroup(index=i, prompt_ids=[3 + i, 9, 17, 4], prompt_text="", reference=None, group_size=2)
        for i in range(2)
    ]


def _prompts() -> list[list[int]]:
    return [list(g.prompt_ids) for g in _groups() for _ in range(g.group_size)]


class Collected:
    """on_finished: every finished job by key (a key finishing twice is an error)."""

    def __init__(self) -> None:
        self.jobs: dict[Any, FinishedGroup] = {}
        self.cond = threading.Condition()

    def __call__(self, done: FinishedGroup) -> None:
        with self.cond:
            assert done.key not in self.jobs, f"job {done.key} finished twice"
            self.jobs[done.key] = done
            self.cond.notify_all()

    def wait(self, key: Any, stream: GenerationStream) -> FinishedGroup:
        with self.cond:
            while key not in self.jobs:
                self.cond.wait(timeout=0.5)
                stream.depth()  # raises when the stream stopped
            return self.jobs[key]


class MidDecodeGate(HFEngine):
    """An hf engine that, once armed, stops inside its decode loop (after `after` forwards, i.e. with
    tokens already sampled) until released: a test acts while a decode is provably in progress."""

    def __init__(self, after: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.after, self.forwards = after, 0
        self.inside, self.release = threading.Event(), threading.Event()
        self.armed = True

    def _forward(self, input_ids: torch.Tensor, cache: Any, past: int) -> tuple[torch.Tensor, Any]:
        self.forwards += 1
        if self.armed and self.forwards == self.after:
            self.armed = False
            self.inside.set()
            assert self.release.wait(timeout=120), "the test never released the engine"
        return super()._forward(input_ids, cache, past)


def _reference(model: torch.nn.Module, params: SamplingParams) -> list[Generation]:
    """What an undisturbed engine holding `model` samples with these (seeded) params."""
    return build_engine("hf", model=model, **ENGINE).generate(_prompts(), params)


def _assert_same(samples: list[Sample], expected: list[Generation]) -> None:
    assert [s.response_ids for s in samples] == [g.response_ids for g in expected]
    for s, g in zip(samples, expected, strict=True):
        assert s.behaviour_logprobs == pytest.approx(g.logprobs, abs=1e-6)


def test_weights_published_mid_decode_wait_for_the_decode_to_finish():
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=77)
    want_v0, want_v1 = _reference(V0, params), _reference(V1, params)
    assert [g.response_ids for g in want_v0] != [g.response_ids for g in want_v1]  # the check can tell
    manager = LocalRolloutManager("hf", {"model": V0, **ENGINE})
    gate = manager.engine = MidDecodeGate(after=6, model=V0, **ENGINE)
    done = Collected()
    stream = GenerationStream(manager, done)
    publisher: threading.Thread | None = None
    try:
        stream.add([GroupJob("at v0", _groups(), params, version=0)])
        assert gate.inside.wait(timeout=120), "the job never started decoding"
        publisher = threading.Thread(target=lambda: stream.publish(V1.state_dict(), 1), daemon=True)
        publisher.start()
        # The publish waits for the stream's thread, which is decoding: it cannot have returned.
        publisher.join(timeout=2.0)
        assert publisher.is_alive(), "stream.publish returned while the engine was decoding"
        gate.release.set()
        first = done.wait("at v0", stream)
        publisher.join(timeout=120)
        assert not publisher.is_alive()
        _assert_same(first.samples, want_v0)  # every token sampled by the weights it started with
        assert {s.policy_version for s in first.samples} == {0}
        stream.add([GroupJob("at v1", _groups(), params, version=1)])
        second = done.wait("at v1", stream)
        _assert_same(second.samples, want_v1)
        assert {s.policy_version for s in second.samples} == {1}
    finally:
        gate.release.set()
        stream.close()


class SyncAfterFirstChunk(LocalRolloutManager):
    """Publishes version 1 right after the first task comes back: `poll` runs in the stream's thread,
    before the next chunk is handed out, so the sync falls between chunk 1 and chunk 2 on any machine."""

    def __init__(self, next_weights: dict[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__("hf", kwargs)
        self.next_weights: dict[str, torch.Tensor] | None = next_weights

    def poll(self, timeout_s: float) -> list[TaskResult]:
        results = super().poll(timeout_s)
        if results and self.next_weights is not None:
            self.publish(self.next_weights, 1)
            self.next_weights = None
        return results


CHUNK, BUDGET = 4, 10


def _partial_samples() -> FinishedGroup:
    manager = SyncAfterFirstChunk(V1.state_dict(), model=V0, **ENGINE)
    done = Collected()
    stream = GenerationStream(manager, done, partial=True, chunk_tokens=CHUNK)
    try:
        # Temperature 1, no truncation, no EOS: the behaviour log-prob is the full-softmax log-prob.
        params = SamplingParams(max_new_tokens=BUDGET, temperature=1.0, seed=3)
        stream.add([GroupJob("partial", _groups(), params, version=0, exact=False)])
        return done.wait("partial", stream)
    finally:
        stream.close()


def test_a_partial_rollout_keeps_each_tokens_version_and_behaviour_logprob():
    finished = _partial_samples()
    assert finished.chunks == 3  # 4 + 4 + 2 tokens
    for s in finished.samples:
        assert len(s.response_ids) == BUDGET and s.finish_reason == "length"
        assert s.token_versions == [0] * CHUNK + [1] * (BUDGET - CHUNK)
        assert s.policy_version == 0  # the oldest token's
        v0 = learner_logprobs(V0, s.prompt_ids, s.response_ids)
        v1 = learner_logprobs(V1, s.prompt_ids, s.response_ids)  # each given the whole prefix
        got = torch.tensor(s.behaviour_logprobs)
        torch.testing.assert_close(got[:CHUNK], v0[:CHUNK], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[CHUNK:], v1[CHUNK:], atol=1e-5, rtol=0)
        assert (v0[CHUNK:] - v1[CHUNK:]).abs().max() > 1e-2  # v0's log-probs would be told apart


def test_the_cispo_weight_of_a_two_version_sample_is_exact_per_token():
    """The learner at version 1 trains on a sample whose first chunk came from version 0: its CISPO
    weight (the gradient of the loss per token, over -A) is 1 on its own tokens and pi_v1 / pi_v0 on the
    older ones, hand-computed from the two models."""
    samples = _partial_samples().samples
    for i, s in enumerate(samples):
        s.reward = float(i % 2)  # reward variance in every group, so no group is filtered out
    algo = AlgorithmConfig(group_size=2)
    batch, _ = make_train_batch(samples, algo, get_advantage(algo.advantage), pad_token_id=0)
    assert batch is not None and len(batch) == len(samples)
    new = torch.zeros_like(batch.old_logprobs)
    expected = torch.zeros_like(batch.old_logprobs)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        lp0 = learner_logprobs(V0, s.prompt_ids, s.response_ids)
        lp1 = learner_logprobs(V1, s.prompt_ids, s.response_ids)
        # old_logprobs carries each token's own behaviour log-prob, not one version's
        torch.testing.assert_close(batch.old_logprobs[row, p : p + r], torch.tensor(s.behaviour_logprobs))
        new[row, p : p + r] = lp1
        expected[row, p : p + r] = torch.cat([torch.exp(lp1 - lp0)[:CHUNK], torch.ones(r - CHUNK)])
    new.requires_grad_(True)
    loss, _ = cispo_loss(
        new, batch.old_logprobs, batch.advantages, batch.response_mask,
        eps_high=1e6, token_weights=batch.response_mask,
    )  # fmt: skip
    loss.backward()
    mask = batch.response_mask.bool()
    weight = -new.grad / batch.advantages[:, None]  # d loss / d logp = -w * A with unit token weights
    torch.testing.assert_close(weight[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (expected[mask] - 1).abs().max() > 1e-2  # the v0 tokens' weights are not 1
